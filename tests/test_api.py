"""The front door: one installed package, explicit exports, nothing heavy on import."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import tempfile
import zipfile

import pytest

import cascada

REPO = pathlib.Path(__file__).resolve().parent.parent

EXPECTED = {
    "Actor", "ActorDied", "ActorInitFailed", "ActorNotFound", "ActorRef", "ActorSystem", "CascadaError",
    "ConfigurationError", "CudaCrossHost", "DeadlineExceeded", "EndpointConflict", "HandleNotPortable", "OnExhausted", "Placement",
    "PoolExhausted", "ProtocolError", "RemoteError", "SerializationError", "SystemClosed", "TensorLost",
    "TensorPath", "Transport", "TransportClosed", "concurrent", "empty", "run", "via", "Context", "context",
    "current_context", "Overloaded", "RestartIntensityExceeded", "RestartType", "Strategy", "Supervisor", "idempotent", "WrongThread",
    "BudgetExhausted", "Cascade", "FanOut", "Flow", "FlowDepthExceeded", "FlowError", "InvalidDecision", "LoopUntil", "Route", "RoundLimitExceeded", "SELF", "Sequential", "StageFailed", "Step", "ask_flow", "flow_error", "stream_flow", "Topology", "build_topology", "load_topology",
}


def test_all_is_explicit_and_complete() -> None:
    assert set(cascada.__all__) == EXPECTED
    for name in cascada.__all__:
        assert getattr(cascada, name) is not None


def test_error_tree() -> None:
    for name in ("ActorDied", "ActorInitFailed", "ActorNotFound", "ConfigurationError", "DeadlineExceeded",
                 "ProtocolError", "RemoteError", "SerializationError", "SystemClosed", "TransportClosed",
                 "TensorLost", "PoolExhausted", "HandleNotPortable", "EndpointConflict"):
        assert issubclass(getattr(cascada, name), cascada.CascadaError)
    assert issubclass(cascada.DeadlineExceeded, TimeoutError)
    assert issubclass(cascada.ActorNotFound, LookupError)
    assert issubclass(cascada.ConfigurationError, ValueError)


def test_subpackages_are_installed_once_under_cascada() -> None:
    import cascada.actors
    import cascada.transport

    assert "actors" not in sys.modules and "transport" not in sys.modules
    assert pathlib.Path(cascada.actors.__file__).parent.name == "actors"
    code = "import importlib.util, sys; sys.exit(importlib.util.find_spec('actors') is not None)"
    assert subprocess.run([sys.executable, "-c", code], cwd="/").returncode == 0


def test_import_is_light() -> None:
    code = ("import sys, cascada, cascada.actors, cascada.transport, cascada.stages, cascada.cudakernels; "
            "heavy = [m for m in ('torch', 'cupy', 'numpy') if m in sys.modules]; print(heavy); "
            "sys.exit(bool(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.slow
def test_wheel_installs_nothing_at_top_level_but_cascada(tmp_path: pathlib.Path) -> None:
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(REPO)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("cascada-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"cascada", next(t for t in tops if t.endswith(".dist-info"))}
    for sub in ("actors", "transport", "stages", "cudakernels"):
        assert f"cascada/{sub}/__init__.py" in names
    assert "cascada/py.typed" in names
    assert not any(n.startswith("cascada/tests") for n in names)
    # A regular (non-editable) install of that wheel runs a real process actor.
    target = tmp_path / "site"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                          str(wheel)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    code = (
        "import cascada, sys\n"
        f"assert cascada.__file__.startswith({str(target)!r}), cascada.__file__\n"
        "class Ping(cascada.Actor):\n"
        "    async def ping(self): return __import__('cascada').actors.__file__\n"
        "async def main():\n"
        "    async with cascada.ActorSystem() as s:\n"
        "        r = await s.spawn(Ping)\n"
        "        print(await r.ask('ping'))\n"
        "cascada.run(main())\n"
    )
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "TMPDIR": tempfile.gettempdir()}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", env=env, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip().startswith(str(target))


def test_cli_version() -> None:
    out = subprocess.run([str(pathlib.Path(sys.executable).parent / "cascada"), "version"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == cascada.__version__


@pytest.mark.slow
def test_the_package_type_checks_strictly(tmp_path: pathlib.Path) -> None:
    """py.typed is a promise: mypy --strict over the package as it is installed."""
    import shutil

    pkg = tmp_path / "cascada"
    shutil.copytree(REPO / "cascada", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for sub in ("actors", "transport", "stages", "cudakernels"):
        shutil.copytree(REPO / sub, pkg / sub, ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--ignore-missing-imports",
                          "--cache-dir", str(tmp_path / ".mypy_cache"), "-p", "cascada"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
