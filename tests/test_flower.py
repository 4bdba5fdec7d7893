"""Atoll over Flower with real processes: the integration's own venv (flwr cannot share
Atoll's), a real `flower-superlink`, two `flower-supernode`s and a loopback coordinator; the
app (integrations/flower) runs with `flwr run`. Also the flwr-datasets partitioner against
Atoll's own plan.

The venv is created once per integrations/flower/pyproject.toml + install.sh (cached under
~/.cache/atoll, or ATOLL_FLOWER_CACHE)."""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
FLOWER = REPO / "integrations" / "flower"
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def flower_venv() -> Path:
    # Keyed by what decides the packages: a change elsewhere in pyproject.toml only makes
    # install.sh reinstall the app itself into the same venv.
    project = tomllib.loads((FLOWER / "pyproject.toml").read_text())["project"]
    wanted = json.dumps([project["dependencies"], project["optional-dependencies"]])
    key = hashlib.sha256(wanted.encode() + (FLOWER / "install.sh").read_bytes()).hexdigest()[:16]
    cache = Path(os.environ.get("ATOLL_FLOWER_CACHE", Path.home() / ".cache" / "atoll"))
    venv = cache / f"flower-venv-{key}"
    done = subprocess.run(
        ["bash", str(FLOWER / "install.sh"), str(venv), "--datasets"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode != 0:
        pytest.fail(f"install.sh failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return venv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, f"{args[:2]}: {done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_for(what: str, check: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def write_rows(directory: Path) -> list[dict[str, Any]]:
    """Two kinds of pictures (red squares, blue circles; some shared by two rows), text-only
    rows, and a made-up 16-d "CLIP" feature per picture that separates the kinds."""
    rng = np.random.default_rng(0)
    images = directory / "images"
    images.mkdir(parents=True)
    rows: list[dict[str, Any]] = []
    for index in range(12):
        kind = index % 2
        path = images / f"img-{index:02d}.png"
        picture = Image.new("RGB", (32, 32), (245, 245, 245))
        draw = ImageDraw.Draw(picture)
        box = (2 + index % 5, 3, 28, 26 + index % 4)
        if kind == 0:
            draw.rectangle(box, fill=(220, 30, 30))
        else:
            draw.ellipse(box, fill=(30, 40, 220))
        picture.save(path)
        clip = np.eye(16)[kind] + 0.1 * rng.standard_normal(16)
        colour, shape = ("red", "square") if kind == 0 else ("blue", "circle")
        questions = [("What colour is it?", colour), ("Which shape is it?", shape)]
        for number, (question, answer) in enumerate(questions[: 1 + index % 2]):
            rows.append(
                {
                    "id": f"img-{index}-{number}",
                    "image": str(path),
                    "text": f"{question} {answer}",
                    "clip": [float(x) for x in clip],
                    "conversations": [
                        {"from": "human", "value": f"<image>\n{question}"},
                        {"from": "gpt", "value": f"It is {answer}."},
                    ],
                }
            )
    for index in range(5):
        a, b = index + 2, 3 * index
        rows.append(
            {
                "id": f"text-{index}",
                "image": None,
                "text": f"{a}+{b}={a + b}",
                "clip": None,
                "conversations": [
                    {"from": "human", "value": f"What is {a} plus {b}?"},
                    {"from": "gpt", "value": str(a + b)},
                ],
            }
        )
    order = rng.permutation(len(rows))
    return [rows[i] for i in order]


def write_llava(directory: Path, rows: list[dict[str, Any]]) -> tuple[Path, Path]:
    """The rows as a LLaVA JSON (image paths relative to images/) and a features .npz."""
    records = []
    features: dict[str, list[float]] = {}
    for row in rows:
        record: dict[str, Any] = {"id": row["id"], "conversations": row["conversations"]}
        if row["image"] is not None:
            record["image"] = Path(row["image"]).name
            features.setdefault(record["image"], row["clip"])
        records.append(record)
    dataset = directory / "train.json"
    dataset.write_text(json.dumps(records))
    npz = directory / "features.npz"
    np.savez(npz, ids=np.asarray(list(features)), features=np.asarray(list(features.values())))
    return dataset, npz


def partition(state: Path, data: Path, dataset: Path, npz: Path) -> dict[str, Any]:
    coordinator = str(BIN / "coordinator")
    run(coordinator, "init", "--state", str(state), "--federation", "flower")
    run(
        coordinator, "partition", "--state", str(state), "--dataset", str(dataset),
        "--image-root", str(data / "images"), "--features", str(npz), "--experts", "2",
        "--feature-encoder", "hf:/models/clip-vit-large-patch14-336",
        "--seed", "0", "--json",
    )  # fmt: skip
    plan: dict[str, Any] = json.loads((state / "partition" / "plan.json").read_text())
    return plan


@dataclass(frozen=True)
class Planned:
    """The rows, their LLaVA-format copy under data/, and a coordinator state holding
    Atoll's own plan for them (K=2, seed 0): shared by this module's tests."""

    rows: list[dict[str, Any]]
    data: Path
    state: Path
    plan: dict[str, Any]


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory) -> Planned:
    root = tmp_path_factory.mktemp("planned")
    rows = write_rows(root / "data")
    dataset, npz = write_llava(root / "data", rows)
    plan = partition(root / "state", root / "data", dataset, npz)
    return Planned(rows, root / "data", root / "state", plan)


def test_partitioner_matches_atolls_plan(
    flower_venv: Path, planned: Planned, tmp_path: Path
) -> None:
    rows, plan = planned.rows, planned.plan
    ids = [row["id"] for row in rows]
    expected = [[ids[i] for i, k in enumerate(plan["sample_experts"]) if k == e] for e in (0, 1)]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    (tmp_path / "out").mkdir()
    offline = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    offline["PYTHONPATH"] = os.pathsep.join([str(FLOWER), offline.get("PYTHONPATH", "")])
    out = run(
        str(flower_venv / "bin" / "python"), str(REPO / "tests" / "flower" / "partitions.py"),
        str(tmp_path / "rows.json"), str(tmp_path / "out"), str(BIN / "coordinator"),
        str(planned.state / "partition"), env=offline, timeout=300,
    )  # fmt: skip
    result = json.loads(out.splitlines()[-1])
    assert result["clustered"] == expected
    assert result["from_plan"] == expected
    # Balanced: unique pictures and text-only rows per partition differ by at most one.
    image_of = {row["id"]: row["image"] for row in rows}
    pictures = [len({image_of[i] for i in part if image_of[i]}) for part in expected]
    texts = [sum(1 for i in part if image_of[i] is None) for part in expected]
    assert abs(pictures[0] - pictures[1]) <= 1 and sum(pictures) == 12
    assert abs(texts[0] - texts[1]) <= 1 and sum(texts) == 5
    # The two kinds of picture are the two clusters.
    kinds = [{int(image_of[i][-6:-4]) % 2 for i in part if image_of[i]} for part in expected]
    assert sorted(map(sorted, kinds)) == [[0], [1]]


def write_flower_tls(directory: Path) -> Path:
    """A CA and the SuperLink's certificate for 127.0.0.1 (Flower's node auth needs TLS);
    returns the CA certificate's path."""
    directory.mkdir(parents=True)
    now = datetime.now(UTC)

    def certificate(subject: str, key: Any, issuer: str, signer: Any, ca: bool) -> Any:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, server_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ca_cert = certificate("flower-test-ca", ca_key, "flower-test-ca", ca_key, True)
    server_cert = certificate("127.0.0.1", server_key, "flower-test-ca", ca_key, False)
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca_cert.public_bytes(pem))
    (directory / "server.pem").write_bytes(server_cert.public_bytes(pem))
    (directory / "server.key").write_bytes(
        server_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return directory / "ca.pem"


def write_node_key(path: Path) -> Path:
    """A SuperNode's auth key pair in OpenSSH form (as ssh-keygen -t ecdsa writes it);
    returns the public key's path."""
    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    public = path.with_suffix(".pub")
    line = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    public.write_bytes(line + b" " + path.name.encode() + b"\n")
    return public


class Processes:
    """Long-running processes of one test, stopped (SIGTERM, then SIGKILL) at the end."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs, self.env = logs, env
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *argv: str) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("ab")
        process = subprocess.Popen(argv, stdout=log, stderr=log, env=self.env)
        self.running[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def stop(self) -> None:
        for process in self.running.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.running.values():
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def stop_detached(pid_file: Path) -> None:
    """Ends a `site-agent join` the ClientApp started in its own session (if still running)."""
    with contextlib.suppress(OSError, ValueError):
        os.kill(int(pid_file.read_text()), signal.SIGTERM)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    (tmp_path / "logs").mkdir()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FLWR_HOME": str(tmp_path / "flwr-home")}
    procs = Processes(tmp_path / "logs", env)
    try:
        yield procs
    finally:
        procs.stop()
        for site in "ab":
            stop_detached(tmp_path / f"site-{site}" / "flower-join.pid")


def test_flower_supernodes_join_and_train(
    flower_venv: Path, planned: Planned, tmp_path: Path, processes: Processes
) -> None:
    """Two SuperNodes receive invites over Flower and train experts 0 and 1 through Atoll;
    SuperNode b is killed once its site-agent runs: its site trains, uploads and is
    accepted all the same, and the ServerApp reports the node silent. Flower runs as a lab
    should run it: TLS, node authentication (`flwr supernode register`), and the app's
    require-node-auth with both nodes' keys in authorized-keys."""
    data, state = planned.data, planned.state
    flwr = flower_venv / "bin"
    # The SuperLink and SuperNodes start their helpers (flower-superexec, flwr-serverapp,
    # flwr-clientapp) by name.
    processes.env["PATH"] = os.pathsep.join([str(flwr), os.environ.get("PATH", "")])
    ca = write_flower_tls(tmp_path / "tls")
    link = free_port()
    # `flwr run APP loopback` reads the SuperLink connection from FLWR_HOME/config.toml.
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n'
        f'[superlink.loopback]\naddress = "127.0.0.1:{link}"\nroot-certificates = "{ca}"\n'
    )
    # Flower first (it takes a while to start), the coordinator's set-up meanwhile.
    tls = tmp_path / "tls"
    processes.start(
        "superlink", str(flwr / "flower-superlink"), "--ssl-certfile", str(tls / "server.pem"),
        "--ssl-keyfile", str(tls / "server.key"), "--ssl-ca-certfile", str(ca),
        "--enable-supernode-auth", "--host", "127.0.0.1", "--port", str(link),
        "--disable-runtime-dependency-installation",
    )  # fmt: skip
    recipe = yaml.safe_load((REPO / "configs" / "tiny-cpu.yaml").read_text())
    recipe["training"].update(epochs=1, save_steps=1000)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    coordinator = str(BIN / "coordinator")
    run(coordinator, "recipe", "--state", str(state), "--recipe", str(tmp_path / "recipe.yaml"))
    port, enrol_port = free_port(), free_port()
    processes.start(
        "coordinator", coordinator, "serve", "--state", str(state),
        "--listen", f"127.0.0.1:{port}", "--enrol-listen", f"127.0.0.1:{enrol_port}",
        "--heartbeat-seconds", "1",
    )  # fmt: skip
    wait_for("the SuperLink", lambda: listening(link))
    nodes = {}
    authorized = []
    for site in "ab":
        public = write_node_key(tls / f"node-{site}")
        authorized.append(public.read_text())
        run(str(flwr / "flwr"), "supernode", "register", str(public), "loopback", env=processes.env)
        config = (
            f'atoll-site="lab-{site}" atoll-workdir="{tmp_path / f"site-{site}"}" '
            f'atoll-site-agent="{BIN / "site-agent"}" atoll-image-root="{data / "images"}"'
        )
        nodes[site] = processes.start(
            f"supernode-{site}", str(flwr / "flower-supernode"), "--root-certificates", str(ca),
            "--auth-supernode-private-key", str(tls / f"node-{site}"),
            "--superlink", f"127.0.0.1:{link}", "--port", str(free_port()),
            "--node-config", config,
        )  # fmt: skip
    (tls / "authorized-keys").write_text("".join(authorized))
    report_file = tmp_path / "report.json"
    run_config = (
        f'coordinator-state="{state}" coordinator-address="127.0.0.1:{port}" '
        f'enrol-address="127.0.0.1:{enrol_port}" coordinator="{coordinator}" '
        f'require-node-auth=true authorized-keys="{tls / "authorized-keys"}" '
        f"poll-seconds=10.0 reply-timeout-seconds=60.0 "
        f"silent-after-seconds=30.0 wait-for-nodes-seconds=120.0 timeout-seconds=400.0 "
        f'report-file="{report_file}"'
    )
    flwr_run = processes.start(
        "flwr-run", str(flwr / "flwr"), "run", str(FLOWER), "loopback", "--stream",
        "--run-config", run_config,
    )  # fmt: skip

    # Kill SuperNode b while its site trains (its site-agent was started detached).
    def training(site: str) -> bool:
        if flwr_run.poll() is not None:
            return True
        status = json.loads(run(coordinator, "status", "--state", str(state), "--json"))
        return any(r["site"] == site and r["phase"] == "training" for r in status["sites"])

    wait_for("site b to train", lambda: training("lab-b"), 240)
    assert flwr_run.poll() is None, processes.log("flwr-run")[-3000:]
    nodes["b"].send_signal(signal.SIGKILL)
    nodes["b"].wait(10)

    wait_for("the Flower run to end", lambda: flwr_run.poll() is not None, timeout=420)
    assert flwr_run.returncode == 0 and report_file.exists(), processes.log("flwr-run")[-4000:]
    report = json.loads(report_file.read_text())
    assert report["complete"] is True and report["experts"] == 2
    assert {row["site"] for row in report["accepted"].values()} == {"lab-a", "lab-b"}
    by_site = {node["site"]: node for node in report["nodes"].values()}
    assert by_site["lab-a"]["state"] == "joined"
    assert by_site["lab-a"]["status"]["phase"] == "done"
    assert by_site["lab-b"]["state"] == "silent"  # killed; its site carried on without it
    assert report["messages"]["array_records"] == 0 and report["messages"]["received"] >= 4

    # The coordinator's audit log: both sites enrolled and delivered an accepted expert.
    audit = json.loads(run(coordinator, "audit", "--state", str(state), "--json"))
    assert audit["log"]["verified"] is True
    delivered = {row["site"]: row["expert"] for row in audit["provenance"]}
    assert sorted(delivered) == ["lab-a", "lab-b"] and sorted(delivered.values()) == [0, 1]
    # Each site's own view agrees with the coordinator's.
    for site in "ab":
        status = json.loads(
            run(str(BIN / "site-agent"), "status", "--workdir", str(tmp_path / f"site-{site}"),
                "--json")
        )  # fmt: skip
        digest = {r["site"]: r["model_root_digest"] for r in audit["provenance"]}
        assert status["phase"] == "done"
        assert status["accepted"]["model_root_digest"] == digest[f"lab-{site}"]


def test_tokens_only_reach_authenticated_supernodes(flower_venv: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(FLOWER)}
    out = run(
        str(flower_venv / "bin" / "python"), str(REPO / "tests" / "flower" / "node_auth.py"),
        str(tmp_path / "workdir"), env=env,
    )  # fmt: skip
    result = json.loads(out.splitlines()[-1])
    assert result["states"]["7"] == ["refused", "its Flower node key is not in authorized-keys"]
    assert result["states"]["8"][0] == "joined"
    assert result["invited"] == ["lab-k"]  # one token, for node 8's site
    assert all(node == 8 for node, _, _ in result["sent"])  # node 7 was never even asked
    tokens = [token for _, kind, token in result["sent"] if kind == "query.join"]
    assert len(tokens) == 1 and tokens[0].startswith("atoll1.lab-k.")
    assert result["array_records"] == 0
    # A node that pinned another federation CA refuses the token and starts nothing.
    assert result["pinned_join"]["started"] is False
    assert "pins atoll-ca-sha256" in result["pinned_join"]["error"]
    assert result["workdir_files"] == []
