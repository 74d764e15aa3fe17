"""Write the work-pool base job templates in this folder from Prefect's own defaults.

    python deployments/build_templates.py

Each template starts from the default that Prefect ships for its worker type (the same document
`prefect work-pool get-default-base-job-template --type ...` prints) and adds what lynx needs:
LYNX_* defaults in the environment, and for the GPU pool a request for one `nvidia.com/gpu`.
Re-run it after a Prefect upgrade; the tests check that the committed files match and that
Prefect accepts and renders them.
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

# Environment defaults of the flow-run processes. Deployments and `job_variables` may add more;
# database and store credentials come from the worker's environment (never from a template).
# Every flow run sends a heartbeat every 30 s (Prefect's minimum); the automation of
# deployments/automations.py marks a run Crashed when they stop.
HEARTBEAT = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}
CPU_ENV = {"CUDA_VISIBLE_DEVICES": "", "LYNX_FACE_DEVICE": "cpu", "LYNX_DEVICE": "cpu", **HEARTBEAT}
# Process workers share a host: each GPU worker is started with its own CUDA_VISIBLE_DEVICES, which
# the flow-run processes inherit, so the template must not set it. Containers get their GPU from
# the scheduler and fail loudly (LYNX_DEVICE=cuda) if it is missing.
GPU_ENV = {"LYNX_DEVICE": "auto", **HEARTBEAT}
CONTAINER_GPU_ENV = {
    "LYNX_DEVICE": "cuda",
    "NVIDIA_DRIVER_CAPABILITIES": "compute,utility,video",
    **HEARTBEAT,
}


def prefect_default(worker_type: str) -> dict[str, Any]:
    """Prefect's default base job template for a worker type (shipped inside the prefect package)."""
    path = resources.files("prefect.server.api").joinpath(
        "collections_data", "views", "aggregate-worker-metadata.json"
    )
    for collection in json.loads(path.read_text()).values():
        if worker_type in collection:
            return copy.deepcopy(collection[worker_type]["default_base_job_configuration"])
    raise KeyError(f"prefect knows no worker type {worker_type!r}")


def with_env(template: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    template["variables"]["properties"]["env"]["default"] = env
    return template


def process(env: dict[str, str]) -> dict[str, Any]:
    return with_env(prefect_default("process"), env)


def kubernetes_gpu() -> dict[str, Any]:
    template = with_env(prefect_default("kubernetes"), CONTAINER_GPU_ENV)
    variables = template["variables"]["properties"]
    variables["image"]["default"] = "lynx:latest"
    variables["gpu_count"] = {
        "title": "GPUs",
        "description": "NVIDIA GPUs per flow run (resource nvidia.com/gpu); lynx uses one.",
        "type": "integer",
        "minimum": 1,
        "default": 1,
    }
    variables["memory_request"]["default"] = "96Gi"
    variables["memory_limit"]["default"] = "120Gi"
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    container["resources"]["limits"]["nvidia.com/gpu"] = "{{ gpu_count }}"
    container["resources"]["requests"]["nvidia.com/gpu"] = "{{ gpu_count }}"
    pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return template


def docker_gpu() -> dict[str, Any]:
    template = with_env(prefect_default("docker"), CONTAINER_GPU_ENV)
    variables = template["variables"]["properties"]
    variables["image"]["default"] = "lynx:latest"
    # docker-py's device_requests, i.e. `docker run --gpus 1`
    variables["container_create_kwargs"] = {
        "title": "Container Configuration",
        "description": "Extra docker-py arguments for created containers; by default one NVIDIA GPU.",
        "type": "object",
        "default": {"device_requests": [{"driver": "nvidia", "count": 1, "capabilities": [["gpu"]]}]},
    }
    template["job_configuration"]["container_create_kwargs"] = "{{ container_create_kwargs }}"
    return template


TEMPLATES = {
    "process-cpu.json": lambda: process(CPU_ENV),
    "process-gpu.json": lambda: process(GPU_ENV),
    "kubernetes-gpu.json": kubernetes_gpu,
    "docker-gpu.json": docker_gpu,
}


def render(name: str) -> str:
    return json.dumps(TEMPLATES[name](), indent=2) + "\n"


if __name__ == "__main__":
    for file_name in TEMPLATES:
        (HERE / file_name).write_text(render(file_name))
        print(f"wrote {HERE / file_name}")
