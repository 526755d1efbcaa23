"""docker/ and prefect.yaml, checked statically (no Docker engine runs on the machines this is tested on)."""

from __future__ import annotations

import re

import yaml

from tests.conftest import REPO

DOCKER = REPO / "docker"


def test_compose_references_only_defined_services_and_volumes():
    doc = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services, volumes = doc["services"], set(doc.get("volumes") or {})
    assert {"postgres", "prefect-server", "mlflow", "worker", "teacher", "gpu-worker", "vllm-teacher"} <= set(services)
    for name, svc in services.items():
        deps = svc.get("depends_on") or []
        for dep in deps if isinstance(deps, list) else list(deps):
            assert dep in services, f"{name} depends on undefined service {dep}"
        for v in svc.get("volumes") or []:
            src = v.split(":")[0]
            if not src.startswith((".", "/")):
                assert src in volumes, f"{name} mounts undefined volume {src}"
            elif src.startswith("."):
                assert (DOCKER / src).exists(), f"{name} mounts missing file {src}"
        for port in svc.get("ports") or []:
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        if "build" in svc:
            assert (REPO / svc["build"]["dockerfile"]).exists()
    # every image a service uses is built here or pulled by a pinned tag
    built = {s["image"] for s in services.values() if "build" in s}
    for name, svc in services.items():
        img = svc.get("image", "")
        assert img in built or re.search(r":[\w.-]+$", img), f"{name}: image {img!r} is neither built nor pinned"


def _pins(text: str) -> dict[str, str]:
    return {m.group(1).lower(): m.group(2) for m in re.finditer(r"^([A-Za-z0-9_.\-\[\]]+)==(\S+)$", text, re.M)}


def test_images_install_the_pins_of_constraints_txt():
    cpu = (DOCKER / "Dockerfile.cpu").read_text()
    assert (
        "RUN make setup" in cpu and "COPY pyproject.toml constraints.txt Makefile" in cpu
    )  # make setup: -c constraints.txt
    assert "-c constraints.txt" in (REPO / "Makefile").read_text()
    cuda = (DOCKER / "Dockerfile.cuda").read_text()
    m = re.search(r"sed '(s/[^']+)' constraints.txt > (\S+)", cuda)
    assert m and f"-c {m.group(2)}" in cuda
    # apply the image's own edit to constraints.txt: the only pin that may change is torch's local version
    pattern, repl = m.group(1)[2:].rstrip("/").split("/", 1)
    before = (REPO / "constraints.txt").read_text()
    after = re.sub(pattern.replace("+", r"\+"), repl, before, flags=re.M)  # sed BRE: "+" is a plain character
    changed = {k for k, v in _pins(before).items() if _pins(after).get(k) != v}
    assert changed == {"torch"} and _pins(after)["torch"] == "2.13.0"
    # the drivers both images add for the compose stack's Postgres are pinned the same way in both
    extra = set(re.findall(r"(psycopg2-binary==\S+|asyncpg==\S+)", cpu))
    assert extra and extra == set(re.findall(r"(psycopg2-binary==\S+|asyncpg==\S+)", cuda))


def test_prefect_yaml_deployments_point_at_real_flows_and_pools_with_workers():
    from distill.config import config_from_dict, load_config

    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    pools = {
        re.search(r"--pool (\S+)", s["command"]).group(1)
        for s in compose["services"].values()
        if "worker start" in str(s.get("command", ""))
    }
    demo = load_config(REPO / "configs/demo.yaml")
    for d in doc["deployments"]:
        path, fn = d["entrypoint"].split(":")
        assert f"def {fn}(" in (REPO / path).read_text(), d["entrypoint"]
        assert d["work_pool"]["name"] in pools, f"no worker in docker/compose.yaml serves {d['work_pool']['name']}"
        cfg = config_from_dict(d["parameters"]["config"], source=f"prefect.yaml {d['name']}")
        assert cfg.model_dump(exclude={"teacher", "pricing"}) == demo.model_dump(exclude={"teacher", "pricing"})
        assert cfg.teacher.base_url == "http://teacher:8000/v1"
