"""compose.yaml, checked without a Docker engine: the file's promises, then the file
run as local processes on CPU (tests/deploy/local_fleet.py)."""

import re
from collections.abc import Iterator

import httpx
import pytest

from lightpd.controlplane.lightctl.embedded_redis import EmbeddedRedis
from lightpd.controlplane.settings import Settings
from tests.deploy.compose_file import (
    COMPOSE_FILE,
    IMAGE,
    REQUIRED_ENV,
    ROOT,
    MissingVariable,
    check_command,
    load_compose,
    node_env_vars,
    our_services,
)
from tests.deploy.local_fleet import LocalFleet, LocalMapping

NODE_SERVICES = {"prefill": "prefill_node", "decode": "decode_node"}
MODEL_TARGET = "/models/model"


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


def model_readers(compose: dict) -> dict[str, dict]:
    return {
        name: service
        for name, service in our_services(compose).items()
        if any(v.split(":")[1] == MODEL_TARGET for v in service.get("volumes", []))
    }


def one_shots(compose: dict) -> set[str]:
    return {name for name, s in compose["services"].items() if s.get("restart") == "no"}


# --- one image ----------------------------------------------------------------


def test_one_image_is_built_once_and_runs_every_service_but_redis(compose):
    services = compose["services"]
    assert set(services) - set(our_services(compose)) == {"redis"}
    builders = [name for name, s in services.items() if "build" in s]
    assert len(builders) == 1, f"the image would be built by each of {builders}"
    (builder,) = builders
    assert services[builder]["build"] == "."
    assert services[builder]["image"] == IMAGE
    assert (ROOT / "Dockerfile").is_file()
    for name, service in our_services(compose).items():
        if name != builder:
            # Never pulled from a registry under our name: the builder makes it.
            assert service["pull_policy"] == "never", name
            assert builder in service["depends_on"], f"{name} could start before the build"


# --- tokens, keys and the published port ----------------------------------------


@pytest.mark.parametrize("variable", sorted(REQUIRED_ENV))
def test_compose_refuses_to_start_without_each_token(variable):
    raw = COMPOSE_FILE.read_text()
    uses = re.findall(rf"\$\{{{variable}([^}}]*)\}}", raw)
    assert uses, f"{variable} is not used"
    assert all(use.startswith(":?") for use in uses), f"{variable} has a fallback: {uses}"
    for value in (None, ""):  # unset, or set empty
        env = {k: v for k, v in REQUIRED_ENV.items() if k != variable}
        if value is not None:
            env[variable] = value
        with pytest.raises(MissingVariable, match=variable):
            load_compose(env)


def test_no_placeholder_secrets():
    assert "change-me" not in COMPOSE_FILE.read_text().lower()


def test_tokens_and_keys_come_from_the_host_environment(compose):
    services = compose["services"]
    env = services["controlplane"]["environment"]
    assert env["LIGHTPD_ADMIN_TOKEN"] == REQUIRED_ENV["LIGHTPD_ADMIN_TOKEN"]
    assert env["LIGHTPD_API_KEYS"] == REQUIRED_ENV["LIGHTPD_API_KEYS"]  # /v1 is never open
    for name in ("controlplane", *NODE_SERVICES):
        cluster_token = services[name]["environment"]["LIGHTPD_CLUSTER_TOKEN"]
        assert cluster_token == REQUIRED_ENV["LIGHTPD_CLUSTER_TOKEN"]


def test_the_api_is_published_on_loopback_unless_configured(compose):
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"
    controlplane = compose["services"]["controlplane"]
    assert controlplane["ports"] == [
        f"127.0.0.1:8000:{controlplane['environment']['LIGHTPD_PORT']}"
    ]
    host = {**REQUIRED_ENV, "LIGHTPD_PUBLISH_HOST": "0.0.0.0", "LIGHTPD_PUBLISH_PORT": "9000"}
    assert load_compose(host)["services"]["controlplane"]["ports"] == ["0.0.0.0:9000:8000"]


def test_controlplane_listens_beyond_loopback_inside_its_container(compose):
    assert compose["services"]["controlplane"]["environment"]["LIGHTPD_HOST"] == "0.0.0.0"


# --- the model ----------------------------------------------------------------


def test_the_default_model_is_made_inside_the_image_by_a_one_shot_service(compose):
    readers = model_readers(compose)
    assert {"controlplane", *NODE_SERVICES} <= set(readers)
    sources = {v.split(":")[0] for s in readers.values() for v in s["volumes"]}
    (volume,) = sources
    assert volume in compose["volumes"], f"{volume} is not a named volume"
    writers = {
        name: service
        for name, service in our_services(compose).items()
        if any(v.split(":")[0] == volume for v in service.get("volumes", []))
        and name not in readers
    }
    (writer,) = writers
    service = writers[writer]
    (mount,) = [v.split(":") for v in service["volumes"] if v.split(":")[0] == volume]
    assert mount[2:] != ["ro"]
    script = " ".join(service["command"])
    assert re.search(rf"\blightctl model tiny\b.*--out {re.escape(mount[1])}\b", script)
    assert writer in one_shots(compose)
    for name in readers:
        condition = compose["services"][name]["depends_on"][writer]["condition"]
        assert condition == "service_completed_successfully", name


def test_a_model_folder_of_the_host_is_mounted_read_only_instead():
    services = load_compose({**REQUIRED_ENV, "LIGHTPD_MODEL_DIR": "/data/Llama-3.1-8B"})["services"]
    for name in ("controlplane", *NODE_SERVICES):
        assert f"/data/Llama-3.1-8B:{MODEL_TARGET}:ro" in services[name]["volumes"]


def test_every_process_reads_the_model_where_it_is_mounted_read_only(compose):
    for service in model_readers(compose).values():
        assert [v for v in service["volumes"] if v.endswith(f":{MODEL_TARGET}:ro")]
    assert compose["services"]["controlplane"]["environment"]["LIGHTPD_MODEL"] == MODEL_TARGET
    for name in NODE_SERVICES:
        assert f"--model={MODEL_TARGET}" in compose["services"][name]["command"]


def test_nothing_is_taken_from_the_host_checkout_by_default(compose):
    """No bind mount at all unless LIGHTPD_MODEL_DIR names one: not the host's .venv,
    not a model written by it."""
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source in compose["volumes"], f"{name} mounts {source} from the host"
        assert ".venv" not in str(service.get("command")), name


def test_redis_asks_for_the_password_the_control_plane_gives(compose):
    redis = compose["services"]["redis"]
    password = REQUIRED_ENV["LIGHTPD_REDIS_PASSWORD"]
    assert redis["command"][redis["command"].index("--requirepass") + 1] == password
    assert redis["environment"]["REDISCLI_AUTH"] == password  # its health check's redis-cli
    url = compose["services"]["controlplane"]["environment"]["LIGHTPD_REDIS_URL"]
    assert url == f"redis://:{password}@redis:6379/0"


def test_redis_keeps_an_append_only_file_on_a_named_volume(compose):
    redis = compose["services"]["redis"]
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert "redis-data:/data" in redis["volumes"]
    assert "redis-data" in compose["volumes"]


# --- health checks and commands -------------------------------------------------


def test_every_service_has_a_healthcheck_or_gates_by_its_exit(compose):
    for name, service in compose["services"].items():
        if name in one_shots(compose):
            continue
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD" and len(test) > 1, name
    for name, service in compose["services"].items():
        for dependency, rule in service.get("depends_on", {}).items():
            expected = (
                "service_completed_successfully"
                if dependency in one_shots(compose)
                else "service_healthy"
            )
            assert rule["condition"] == expected, f"{name} -> {dependency}"


def test_every_long_running_service_is_started_again_when_it_exits(compose):
    """What `lightctl up` does for its fleet, compose does by restart policy: Redis, the
    control plane and every node come back after a crash (Docker backs off itself)."""
    for name, service in compose["services"].items():
        if name in one_shots(compose):
            continue
        assert service.get("restart") in ("unless-stopped", "always", "on-failure"), name


def test_node_healthchecks_ask_their_own_node_in_its_role(compose):
    for name, module in NODE_SERVICES.items():
        service = compose["services"][name]
        port = next(a for a in service["command"] if a.startswith("--port=")).split("=")[1]
        assert f"--host={name}" in service["command"]
        test = service["healthcheck"]["test"]
        assert test[1:4] == ["python", "-m", "lightpd.controlplane.lightctl.healthcheck"]
        assert f"tcp://{name}:{port}" in test
        assert f"--role={module.removesuffix('_node')}" in test
        # Loading a model and capturing CUDA graphs must not count as failures.
        assert service["healthcheck"]["start_period"].endswith("s")
        assert int(service["healthcheck"]["start_period"][:-1]) >= 300


def test_every_command_of_our_image_exists_in_the_project(compose):
    for service in our_services(compose).values():
        check_command(service["command"])
        if "healthcheck" in service:
            check_command(service["healthcheck"]["test"][1:])


def test_service_environments_are_settings_their_processes_read(compose):
    settings = {f"LIGHTPD_{field.upper()}" for field in Settings.model_fields}
    assert set(compose["services"]["controlplane"]["environment"]) <= settings
    for name in NODE_SERVICES:
        assert set(compose["services"][name]["environment"]) <= node_env_vars()


def test_every_node_service_reserves_its_own_nvidia_gpu(compose):
    gpus = []
    for name in NODE_SERVICES:
        service = compose["services"][name]
        assert "--device=cuda:0" in service["command"]
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia"
        assert "gpu" in device["capabilities"]
        assert len(device["device_ids"]) == 1
        gpus += device["device_ids"]
    assert len(set(gpus)) == len(gpus), "nodes would share a GPU and both size the pool from it"


def test_nodes_take_kv_over_zeromq_between_containers(compose):
    for name in NODE_SERVICES:
        assert "--kv-transport=zmq" in compose["services"][name]["command"]
        assert "ipc" not in compose["services"][name]


# --- the fleet, run from the file ---------------------------------------------


@pytest.fixture(scope="module")
def fleet(compose, tmp_path_factory) -> Iterator[LocalFleet]:
    tmp_path = tmp_path_factory.mktemp("compose")
    mapping = LocalMapping(compose, volumes_dir=tmp_path / "volumes")
    fleet = LocalFleet(compose, mapping, logs=tmp_path)
    password = compose["services"]["redis"]["environment"]["REDISCLI_AUTH"]
    with EmbeddedRedis(mapping.port("redis", 6379), password=password):
        try:
            fleet.start_all(skip=("redis",))
            for name in compose["services"]:
                if name not in one_shots(compose):
                    fleet.wait_healthy(name)
            yield fleet
        finally:
            fleet.stop()


def test_compose_fleet_serves_a_chat_completion_with_an_api_key(compose, fleet):
    env = compose["services"]["controlplane"]["environment"]
    base = f"http://127.0.0.1:{fleet.mapping.port('controlplane', int(env['LIGHTPD_PORT']))}"
    admin = {"Authorization": f"Bearer {env['LIGHTPD_ADMIN_TOKEN']}"}
    api_key = {"Authorization": f"Bearer {env['LIGHTPD_API_KEYS']}"}
    with httpx.Client(base_url=base, timeout=30.0) as http:
        assert http.get("/health").json() == {"status": "ok"}
        nodes = http.get("/admin/nodes", headers=admin).raise_for_status().json()
        assert {n["role"] for n in nodes if n["status"] == "ready"} == set(NODE_SERVICES)
        assert http.get("/v1/models").status_code == 401
        request = {
            "model": env["LIGHTPD_SERVED_MODEL_NAME"],
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 8,
            "temperature": 0,
        }
        assert http.post("/v1/chat/completions", json=request).status_code == 401
        reply = http.post("/v1/chat/completions", json=request, headers=api_key)
    assert reply.status_code == 200, f"{reply.text}\n{fleet.log_tails()}"
    body = reply.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 8


def test_the_model_init_service_wrote_the_model_once(compose, fleet):
    model = fleet.mapping.volumes_dir / "tiny-llama"
    assert (model / "config.json").is_file()
    written = (model / "model.safetensors").stat().st_mtime_ns
    (init,) = one_shots(compose)
    rerun = fleet.run_in(init, fleet.mapping.command(init, compose["services"][init]["command"]))
    assert rerun.returncode == 0, rerun.stderr
    assert (model / "model.safetensors").stat().st_mtime_ns == written


def test_node_healthcheck_passes_only_for_its_node_role_and_token(compose, fleet):
    for name in NODE_SERVICES:
        healthy = fleet.run_healthcheck(name)
        assert healthy.returncode == 0, healthy.stderr
        assert healthy.stdout.startswith(f"healthy: {name} node ")
    prefill_check = fleet.healthcheck("prefill")
    wrong_role = [*prefill_check[:-1], "--role=decode"]
    reply = fleet.run_in("prefill", wrong_role)
    assert reply.returncode == 1
    assert "is a prefill node, not a decode node" in reply.stderr
    reply = fleet.run_in("prefill", [*prefill_check, "--timeout-s=1"], LIGHTPD_CLUSTER_TOKEN="x")
    assert reply.returncode == 1
    assert "no answer" in reply.stderr
