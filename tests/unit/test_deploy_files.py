"""The deployment files agree with each other and with the repository.

``docker/compose.yml`` and both Dockerfiles parse and reference only files that exist; the
compose services run exactly the Procfile's commands; compose has Redis with AOF on a volume,
the gpu worker with a GPU reservation and ``-c 1``, a single beat, Flower (published on
127.0.0.1 only, and refused by ``core.flower`` without a login) and the feed, each with a
health check; the GPU image starts from a multi-arch (arm64 + amd64) CUDA base.

compose.yml is read with PyYAML when it is installed, else with ``mini_yaml`` below, a strict
parser of the YAML subset the file uses (it raises on anything else); when PyYAML is there,
both must give the same document.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from core.errors import ConfigError
from core.flower import is_loopback, plan_flower
from tests.conftest import REPO

DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yml"
PROCFILE = REPO / "Procfile"
DOCKERFILES = {"Dockerfile": DOCKER / "Dockerfile", "Dockerfile.gpu": DOCKER / "Dockerfile.gpu"}
PROCESSES = {"gpu", "exec", "beat", "flower", "feed", "stream"}


# --- a strict parser for the YAML subset of compose.yml --------------------------------------


class MiniYamlError(ValueError):
    """The text uses YAML this parser does not support."""


def _scalar(text: str) -> Any:
    text = text.strip()
    if text[:1] in ("'", '"'):
        value, rest = _quoted(text, 0)
        if text[rest:].strip():
            raise MiniYamlError(f"text after a quoted string: {text!r}")
        return value
    if text[:1] in ("|", ">", "&", "*", "!", "%", "@", "`"):
        raise MiniYamlError(f"unsupported YAML: {text!r}")
    if text in ("true", "True"):
        return True
    if text in ("false", "False"):
        return False
    if text in ("null", "~", ""):
        return None
    if re.fullmatch(r"[-+]?[0-9]+", text):
        return int(text)
    if re.fullmatch(r"[-+]?[0-9]*\.[0-9]+", text):
        return float(text)
    return text


def _quoted(text: str, i: int) -> tuple[str, int]:
    """A quoted string starting at ``text[i]``; (value, index after the closing quote)."""
    quote, i, out = text[i], i + 1, []
    while i < len(text):
        c = text[i]
        if quote == "'" and c == "'":
            if text[i + 1:i + 2] == "'":
                out.append("'")
                i += 2
                continue
            return "".join(out), i + 1
        if quote == '"' and c == "\\":
            esc = text[i + 1:i + 2]
            if esc not in ('"', "\\", "n", "t", "/"):
                raise MiniYamlError(f"unsupported escape \\{esc}")
            out.append({"n": "\n", "t": "\t"}.get(esc, esc))
            i += 2
            continue
        if quote == '"' and c == '"':
            return "".join(out), i + 1
        out.append(c)
        i += 1
    raise MiniYamlError(f"unterminated string: {text!r}")


def _flow(text: str, i: int) -> tuple[Any, int]:
    """A flow value ([...], {...}, quoted or plain) starting at ``text[i]``."""
    while text[i] == " ":
        i += 1
    c = text[i]
    if c in "[{":
        close, items, pairs = ("]" if c == "[" else "}"), [], {}
        i += 1
        while True:
            while text[i] == " ":
                i += 1
            if text[i] == close:
                return (items if c == "[" else pairs), i + 1
            if c == "[":
                value, i = _flow(text, i)
                items.append(value)
            else:
                match = re.compile(r"([A-Za-z0-9_.-]+):\s").match(text, i)
                if not match:
                    raise MiniYamlError(f"bad flow mapping key at {text[i:]!r}")
                value, i = _flow(text, match.end())
                pairs[match.group(1)] = value
            while text[i] == " ":
                i += 1
            if text[i] == ",":
                i += 1
            elif text[i] != close:
                raise MiniYamlError(f"expected ',' or {close!r} at {text[i:]!r}")
    if c in "'\"":
        return _quoted(text, i)
    match = re.compile(r"[^,\]}]*").match(text, i)
    assert match is not None
    return _scalar(match.group(0)), match.end()


def _value(text: str) -> Any:
    text = text.strip()
    if text[:1] in "[{":
        try:
            value, end = _flow(text, 0)
        except IndexError:
            raise MiniYamlError(f"unterminated flow value: {text!r}") from None
        if text[end:].strip():
            raise MiniYamlError(f"text after a flow value: {text!r}")
        return value
    return _scalar(text)


def _strip_comment(line: str) -> str:
    quote, escaped = None, False
    for i, c in enumerate(line):
        if quote:
            if escaped:
                escaped = False
            elif quote == '"' and c == "\\":
                escaped = True
            elif c == quote:
                quote = None
        elif c in "'\"" and (i == 0 or line[i - 1] in " [{,:-"):  # a quoted scalar starts
            quote = c
        elif c == "#" and (i == 0 or line[i - 1] == " "):
            return line[:i].rstrip()
    return line.rstrip()


def mini_yaml(text: str) -> Any:
    """Parse block mappings/sequences of flow values, quoted and plain scalars, comments."""
    lines = []
    for raw in text.splitlines():
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise MiniYamlError("tab indentation")
        line = _strip_comment(raw)
        if line.strip():
            lines.append((len(line) - len(line.lstrip(" ")), line.strip()))

    def block(i: int, indent: int) -> tuple[Any, int]:
        if lines[i][1].startswith("- "):
            seq = []
            while i < len(lines) and lines[i][0] == indent and lines[i][1].startswith("- "):
                item = lines[i][1][2:]
                if re.match(r"[A-Za-z0-9_.-]+:(\s|$)", item):
                    raise MiniYamlError(f"mapping inside a block sequence: {item!r}")
                seq.append(_value(item))
                i += 1
            return seq, i
        mapping: dict[str, Any] = {}
        while i < len(lines) and lines[i][0] == indent:
            match = re.fullmatch(r"([A-Za-z0-9_.-]+):(?:\s+(.*))?", lines[i][1])
            if not match:
                raise MiniYamlError(f"not a 'key: value' line: {lines[i][1]!r}")
            key, rest = match.group(1), match.group(2)
            if key in mapping:
                raise MiniYamlError(f"duplicate key {key!r}")
            i += 1
            if rest is not None:
                mapping[key] = _value(rest)
            elif i < len(lines) and lines[i][0] > indent:
                mapping[key], i = block(i, lines[i][0])
            else:
                mapping[key] = None
        if i < len(lines) and lines[i][0] > indent:
            raise MiniYamlError(f"unexpected indentation at {lines[i][1]!r}")
        return mapping, i

    doc, end = block(0, lines[0][0]) if lines else (None, 0)
    if end != len(lines):
        raise MiniYamlError(f"unexpected line {lines[end][1]!r}")
    return doc


def load_compose() -> dict[str, Any]:
    text = COMPOSE.read_text()
    try:
        import yaml
    except ImportError:
        return mini_yaml(text)
    return yaml.safe_load(text)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = load_compose()
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict)
    return doc


def test_mini_yaml_agrees_with_pyyaml() -> None:
    yaml = pytest.importorskip("yaml")
    assert mini_yaml(COMPOSE.read_text()) == yaml.safe_load(COMPOSE.read_text())


def test_mini_yaml_refuses_what_it_does_not_know() -> None:
    for text in ("a: |\n  x\n", "a: &x 1\n", "a:\n  - b: 1\n", "a: [1, 2\n", "a: 1\na: 2\n"):
        with pytest.raises(MiniYamlError):
            mini_yaml(text)
    assert mini_yaml("a: {b: [x, 'y z', \"q\\\"\"], c: on-failure:3}  # note\n") == {
        "a": {"b": ["x", "y z", 'q"'], "c": "on-failure:3"}}


# --- commands: Procfile == compose == Dockerfile CMD ------------------------------------------


def _expand_defaults(word: str) -> str:
    """``${VAR:-default}`` becomes ``default`` (the command a fresh environment runs)."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-([^}]*)\}", r"\1", word)


def normalise(argv: list[str]) -> list[str]:
    """One argv for the forms a process manager accepts: ``sh -c "..."``, ``exec``, leading
    ``VAR=value`` assignments, ``env VAR=value``, ``${VAR:-default}``."""
    argv = list(argv)
    if len(argv) == 3 and argv[0] in ("sh", "/bin/sh", "bash", "/bin/bash") and argv[1] == "-c":
        argv = shlex.split(argv[2].replace("$$", "$"))
    if argv[:1] == ["env"]:
        argv = argv[1:]
    while argv and (argv[0] == "exec" or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0])):
        argv = argv[1:]
    return [_expand_defaults(a) for a in argv]


def procfile() -> dict[str, list[str]]:
    out = {}
    for line in PROCFILE.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, command = line.partition(":")
        assert re.fullmatch(r"[a-z][a-z0-9_-]*", name), line
        assert name not in out, f"Procfile names {name} twice"
        out[name] = normalise(shlex.split(command))
    return out


def compose_command(service: dict[str, Any]) -> list[str]:
    command = service.get("command")
    assert command, f"service without a command: {service}"
    return normalise(shlex.split(command) if isinstance(command, str) else list(command))


def test_procfile_has_every_process() -> None:
    procs = procfile()
    assert set(procs) == PROCESSES
    assert procs["flower"] == ["python", "-m", "core.flower"]
    assert procs["feed"] == ["python", "-m", "core.market.feed"]
    assert procs["stream"] == ["python", "-m", "core.streams.trade_updates"]
    joined = PROCFILE.read_text()
    assert "--basic-auth" not in joined and "PASSWORD" not in joined  # no secret on a cmdline


def test_compose_runs_the_procfile_commands(compose: dict[str, Any]) -> None:
    procs = procfile()
    commands = {name: compose_command(svc) for name, svc in compose["services"].items()
                if name != "redis"}
    for proc, argv in procs.items():
        matching = [name for name, cmd in commands.items() if cmd == argv]
        assert len(matching) == 1, f"Procfile {proc}: {argv} is run by {matching} in compose"
    unknown = {name for name, cmd in commands.items() if cmd not in procs.values()}
    assert not unknown, f"compose services not in the Procfile: {unknown}"


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    known = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT",
             "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        instr, _, args = line.partition(" ")
        assert instr.upper() in known, f"{path.name}: unknown instruction {instr!r}"
        assert instr == instr.upper(), f"{path.name}: {instr} in lower case"
        out.append((instr, args.strip()))
    assert not pending, f"{path.name} ends with a continuation"
    assert next(i for i, _ in out if i != "ARG") == "FROM", f"{path.name} must start with FROM"
    return out


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_parses_and_copies_only_existing_files(name: str) -> None:
    steps = parse_dockerfile(DOCKERFILES[name])
    copies = [args for instr, args in steps if instr in ("COPY", "ADD")]
    assert copies
    for args in copies:
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        *sources, _dest = words
        for src in sources:  # the build context is the repository root (compose: context ..)
            assert (REPO / src).exists(), f"{name}: COPY {src}: no such file in the repository"
    cmds = [args for instr, args in steps if instr == "CMD"]
    assert len(cmds) == 1
    json.loads(cmds[0])  # exec form


def test_dockerfile_cmds_are_procfile_commands() -> None:
    procs = procfile()
    for name, proc in (("Dockerfile", "exec"), ("Dockerfile.gpu", "gpu")):
        cmd = next(a for i, a in parse_dockerfile(DOCKERFILES[name]) if i == "CMD")
        assert normalise(json.loads(cmd)) == procs[proc], name


def test_gpu_image_is_a_multi_arch_cuda_base() -> None:
    text = DOCKERFILES["Dockerfile.gpu"].read_text()
    base = next(a for i, a in parse_dockerfile(DOCKERFILES["Dockerfile.gpu"]) if i == "FROM")
    # nvidia/cuda's Ubuntu 22.04/24.04 tags are published for linux/amd64 and linux/arm64
    assert re.fullmatch(r"nvidia/cuda:12\.\d+(\.\d+)?-(base|runtime|cudnn-runtime)-"
                        r"ubuntu2[24]\.04", base), base
    comments = " ".join(line for line in text.splitlines() if line.startswith("#"))
    assert "arm64" in comments and "amd64" in comments and "GH200" in comments


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_images_do_not_run_as_root(name: str) -> None:
    users = [a for i, a in parse_dockerfile(DOCKERFILES[name]) if i == "USER"]
    assert users and users[-1] not in ("root", "0"), name


# --- compose: references, Redis, gpu worker, beat, Flower, feed, health checks ------------


def test_compose_references_only_existing_files(compose: dict[str, Any]) -> None:
    declared_volumes = set(compose.get("volumes") or {})
    for name, svc in compose["services"].items():
        build = svc.get("build")
        if build is not None:
            if isinstance(build, str):
                build = {"context": build}
            context = (DOCKER / build.get("context", ".")).resolve()
            assert context.is_dir(), f"{name}: build context {context}"
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            assert dockerfile.is_file(), f"{name}: dockerfile {dockerfile}"
        else:
            assert svc.get("image"), f"{name}: neither build nor image"
        env_files = svc.get("env_file") or []
        for entry in [env_files] if isinstance(env_files, str | dict) else env_files:
            if isinstance(entry, dict) and entry.get("required") is False:
                continue  # optional
            path = entry["path"] if isinstance(entry, dict) else entry
            assert (DOCKER / path).is_file(), f"{name}: env_file {path} is required but missing"
        for volume in svc.get("volumes") or []:
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source")
            if source.startswith((".", "/", "~")):
                assert (DOCKER / source).exists(), f"{name}: bind mount {source}"
            else:
                assert source in declared_volumes, f"{name}: volume {source} not declared"
        for dep in svc.get("depends_on") or {}:
            assert dep in compose["services"], f"{name} depends on unknown {dep}"


def _services_running(compose: dict[str, Any], proc: str) -> list[str]:
    argv = procfile()[proc]
    return [n for n, s in compose["services"].items()
            if n != "redis" and compose_command(s) == argv]


def test_compose_redis_appends_to_a_volume(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    argv = compose_command(redis)
    assert argv[0] == "redis-server"
    assert "--appendonly" in argv and argv[argv.index("--appendonly") + 1] == "yes"
    mounts = [v.split(":") for v in redis.get("volumes", [])]
    assert any(m[0] in (compose.get("volumes") or {}) and m[1] == "/data" for m in mounts)


def test_compose_gpu_worker_has_a_gpu_and_concurrency_one(compose: dict[str, Any]) -> None:
    (name,) = _services_running(compose, "gpu")
    svc = compose["services"][name]
    argv = compose_command(svc)
    assert argv[argv.index("-Q") + 1] == "gpu" and argv[argv.index("-c") + 1] == "1"
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d.get("capabilities", []) and d.get("driver") == "nvidia"
               for d in devices)
    assert svc["build"]["dockerfile"].endswith("Dockerfile.gpu")


def test_compose_has_exactly_one_beat_and_one_feed(compose: dict[str, Any]) -> None:
    for proc in ("beat", "feed", "stream"):
        services = _services_running(compose, proc)
        assert len(services) == 1, (proc, services)
        assert compose["services"][services[0]].get("deploy", {}).get("replicas", 1) == 1
    beat_like = [n for n, s in compose["services"].items()
                 if " beat " in f" {' '.join(compose_command(s))} "]
    assert len(beat_like) == 1, beat_like


def test_compose_flower_is_local_and_needs_a_login(compose: dict[str, Any]) -> None:
    (name,) = _services_running(compose, "flower")
    svc = compose["services"][name]
    env = svc.get("environment") or {}
    address = env.get("TRADING_FLOWER_ADDRESS", "127.0.0.1")
    port = int(env.get("TRADING_FLOWER_PORT", 5555))
    assert str(env.get("TRADING_FLOWER_UNAUTHENTICATED_LOCALHOST", "false")).lower() == "false"
    assert not any(k.startswith("FLOWER_") for k in env)  # no FLOWER_UNAUTHENTICATED_API etc.
    assert svc["ports"] == [f"127.0.0.1:{port}:{port}"]
    # bound on all interfaces inside the container: core.flower refuses it without a login
    with pytest.raises(ConfigError):
        plan_flower(None, None, address, port, unauthenticated_localhost=True)
    assert plan_flower("ops", "pw", address, port).authenticated


def test_compose_publishes_ports_on_loopback_only(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        for port in svc.get("ports") or []:
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), (name, port)


def test_compose_services_have_health_checks(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        check = svc.get("healthcheck")
        assert check and check.get("test"), f"{name} has no health check"
        test = check["test"]
        assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL"), (name, test)
        shell = " ".join(test[1:])
        assert "$" not in shell.replace("$$", ""), f"{name}: unescaped $ in {shell!r}"
    # the workers' checks ping their own node name
    for proc in ("gpu", "exec"):
        (name,) = _services_running(compose, proc)
        test = " ".join(compose["services"][name]["healthcheck"]["test"])
        assert f"-d {proc}@$$HOSTNAME" in test, test


# --- core.flower's refusal rules (what the Procfile and compose rely on) -----------------


@pytest.mark.parametrize(("address", "loopback"), [
    ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("[::1]", True),
    ("localhost", True), ("0.0.0.0", False), ("", False), ("::", False),
    ("10.0.0.5", False), ("example.com", False)])
def test_is_loopback(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


def test_flower_refusals() -> None:
    with pytest.raises(ConfigError, match="needs a login"):
        plan_flower(None, None, "127.0.0.1", 5555)
    with pytest.raises(ConfigError, match="loopback"):
        plan_flower(None, None, "0.0.0.0", 5555, unauthenticated_localhost=True)
    with pytest.raises(ConfigError, match="loopback"):
        plan_flower("", "", "", 5555, unauthenticated_localhost=True)
    with pytest.raises(ConfigError, match="TRADING_FLOWER_PASSWORD"):
        plan_flower("ops", None, "127.0.0.1", 5555, unauthenticated_localhost=True)
    with pytest.raises(ConfigError, match="TRADING_FLOWER_USER"):
        plan_flower(None, "pw", "127.0.0.1", 5555)
    with pytest.raises(ConfigError, match="','"):
        plan_flower("ops", "a,b", "127.0.0.1", 5555)
    with pytest.raises(ConfigError, match="':'"):
        plan_flower("o:ps", "pw", "127.0.0.1", 5555)
    open_local = plan_flower(None, None, "127.0.0.1", 5555, unauthenticated_localhost=True)
    assert not open_local.authenticated


def test_flower_secret_goes_to_the_environment_not_the_command_line() -> None:
    plan = plan_flower("ops", "s3cret-pw", "0.0.0.0", 5601)
    argv = plan.argv()
    assert argv[1:] == ["-m", "celery", "-A", "tasks", "flower", "--address=0.0.0.0",
                        "--port=5601"]
    assert "s3cret-pw" not in " ".join(argv) and "s3cret-pw" not in repr(plan)
    env = plan.env({"FLOWER_UNAUTHENTICATED_API": "true", "TRADING_FLOWER_PASSWORD": "x",
                    "PATH": "/bin"})
    assert env == {"PATH": "/bin", "FLOWER_BASIC_AUTH": "ops:s3cret-pw"}


def test_flower_module_exits_2_without_a_login(tmp_path: Path) -> None:
    # run from an empty folder: no .env there
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "TRADING_FLOWER_ADDRESS": "0.0.0.0",
           "TRADING_FLOWER_UNAUTHENTICATED_LOCALHOST": "true"}
    proc = subprocess.run([sys.executable, "-m", "core.flower"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "refusing to start Flower" in proc.stderr and "loopback" in proc.stderr
