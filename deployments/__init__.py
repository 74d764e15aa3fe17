"""Work-pool base job templates and worker setup for the lynx deployments."""
