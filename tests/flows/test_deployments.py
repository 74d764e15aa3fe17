"""prefect.yaml and the work-pool templates: valid for Prefect, and saying what the docs say."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from deployments.build_templates import TEMPLATES, render
from tests.conftest import REPO_ROOT

DEPLOYMENTS = REPO_ROOT / "deployments"


def defaults(template: dict) -> dict:
    return {
        name: spec["default"]
        for name, spec in template["variables"]["properties"].items()
        if "default" in spec
    }


def rendered(name: str) -> dict:
    from prefect.utilities.templating import apply_values

    template = json.loads((DEPLOYMENTS / name).read_text())
    return apply_values(template["job_configuration"], defaults(template))


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_committed_templates_are_the_generated_ones(name):
    assert (DEPLOYMENTS / name).read_text() == render(name), "run: python deployments/build_templates.py"


@pytest.mark.parametrize("name", ["process-cpu.json", "process-gpu.json"])
def test_process_templates_load_with_prefects_process_worker_configuration(prefect_harness, name):
    from prefect.workers.process import ProcessJobConfiguration

    template = json.loads((DEPLOYMENTS / name).read_text())
    config = asyncio.run(
        ProcessJobConfiguration.from_template_and_values(template, {"env": {"LYNX_GPU_DEPLOYMENT": "x/y"}})
    )
    assert config.env["LYNX_GPU_DEPLOYMENT"] == "x/y"  # a deployment's env adds to the pool's
    if name == "process-cpu.json":
        assert config.env["CUDA_VISIBLE_DEVICES"] == ""  # CPU stages never grab a GPU
    else:
        assert "CUDA_VISIBLE_DEVICES" not in config.env  # each GPU worker brings its own


def test_kubernetes_template_requests_one_nvidia_gpu():
    job = rendered("kubernetes-gpu.json")
    container = job["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert job["env"]["LYNX_DEVICE"] == "cuda"


def test_docker_template_requests_one_nvidia_gpu():
    job = rendered("docker-gpu.json")
    [request] = job["container_create_kwargs"]["device_requests"]
    assert request == {"driver": "nvidia", "count": 1, "capabilities": [["gpu"]]}


@pytest.mark.parametrize(
    "name,pool_type",
    [
        ("kubernetes-gpu.json", "kubernetes"),
        ("docker-gpu.json", "docker"),
        ("process-gpu.json", "process"),
        ("process-cpu.json", "process"),
    ],
)
def test_a_prefect_server_accepts_each_template_for_a_work_pool(prefect_harness, name, pool_type):
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    template = json.loads((DEPLOYMENTS / name).read_text())
    pool_name = f"check-{name.removesuffix('.json')}"
    with get_client(sync_client=True) as client:
        pool = client.create_work_pool(
            WorkPoolCreate(name=pool_name, type=pool_type, base_job_template=template), overwrite=True
        )
        assert pool.base_job_template == template


def test_prefect_yaml_deploys_the_flows_with_an_explicit_pull_step():
    from prefect.flows import load_flow_from_entrypoint

    config = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    [pull] = config["pull"]
    assert "prefect.deployments.steps.set_working_directory" in pull
    deployments = {d["name"]: d for d in config["deployments"]}
    expected = {
        "generate": ("lynx", "lynx-cpu"),
        "gpu-stages": ("lynx-gpu", "lynx-gpu"),
        "campaign": ("lynx-campaign", "lynx-cpu"),
        "evaluate": ("lynx-eval", "lynx-cpu"),
        "erase": ("lynx-erase", "lynx-cpu"),
    }
    for name, (flow_name, pool) in expected.items():
        deployment = deployments[name]
        assert load_flow_from_entrypoint(str(REPO_ROOT / deployment["entrypoint"])).name == flow_name
        assert deployment["work_pool"]["name"] == pool
    [schedule] = deployments["campaign"]["schedules"]
    assert schedule["cron"] and schedule["active"] is False
    for name in ("generate", "campaign"):  # the CPU flows hand their GPU stages to the GPU pool
        assert (
            deployments[name]["work_pool"]["job_variables"]["env"]["LYNX_GPU_DEPLOYMENT"]
            == "lynx-gpu/gpu-stages"
        )
    assert (REPO_ROOT / deployments["campaign"]["parameters"]["campaign_file"]).is_file()


def test_the_example_campaign_is_valid():
    from lynx.campaign import load_campaign

    spec = load_campaign(REPO_ROOT / "examples" / "campaign.yaml")
    assert len(spec.requests()) == len(spec.subjects) * len(spec.prompts)
    assert Path(spec.subjects[0].photo).is_file()  # resolved against the file's folder


def test_start_workers_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(DEPLOYMENTS / "start-workers.sh")], check=True)


def test_every_shell_script_is_executable_in_git():
    """The README runs `deployments/start-workers.sh setup`: a script committed without its run
    bit fails with "Permission denied" on a fresh clone (mode 100644 in the index)."""
    listing = subprocess.run(
        ["git", "ls-files", "-s", "--", "deployments", "scripts"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    ).stdout.splitlines()
    scripts = {line.split("\t", 1)[1]: line.split()[0] for line in listing if line.endswith(".sh")}
    assert "deployments/start-workers.sh" in scripts
    assert {path: mode for path, mode in scripts.items() if mode != "100755"} == {}
