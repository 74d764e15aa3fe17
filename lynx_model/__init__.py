"""Lynx on the diffusers Wan2.1 DiT: pure PyTorch + diffusers (no Prefect, database or S3 here)."""
