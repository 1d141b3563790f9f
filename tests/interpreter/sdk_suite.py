"""Runs the novita-sandbox SDK's own code-interpreter test suite (the
`novita_sandbox/code_interpreter/tests` package it ships) against the stasis
interpreter server (rootfs/interpreter/stasis_interpreter.py) on the host.

The SDK's tests run unmodified, with the SDK's own conftest and fixtures:
NOVITA_DEBUG is set, so its `sandbox` / `async_sandbox` fixtures create
debug-mode sandboxes whose `run_code` and context calls go to
http://localhost:49999, where this runner starts the server (a fresh one for
each test file, as each of the SDK's tests expects a new sandbox).

Tests that cannot apply to a host-run interpreter server are listed in
DESELECTED with the reason, printed before the run, and deselected by node
id; nothing is skipped silently. `skip_debug` tests that do apply have that
mark removed so that they run (see RUN_DESPITE_SKIP_DEBUG).

    python tests/interpreter/sdk_suite.py [pytest args...]

This file is both the script and the pytest plugin it loads.
"""

import os
import sys

import pytest

from interp_server import interpreter_server


# Node ids, relative to the SDK's tests directory, and why each cannot apply.
DESELECTED = {
    "sync/test_bash.py::test_bash":
        "asserts the image's working directory /home/user; the host-run server works in a temp dir",
    "async/test_async_bash.py::test_bash":
        "asserts the image's working directory /home/user; the host-run server works in a temp dir",
    "sync/test_reconnect.py::test_reconnect":
        "Sandbox.connect is a control-plane API call (debug mode: localhost:3000), not the interpreter",
    "async/test_async_reconnect.py::test_reconnect":
        "AsyncSandbox.connect is a control-plane API call (debug mode: localhost:3000), not the interpreter",
    "sync/env_vars/test_python.py::test_env_vars_on_sandbox":
        "creates a sandbox with envs through the API (a real sandbox lifecycle)",
    "sync/env_vars/test_python.py::test_env_vars_overwrite":
        "creates a sandbox with envs through the API (a real sandbox lifecycle)",
    "sync/env_vars/test_bash.py::test_env_vars_on_sandbox":
        "creates a sandbox with envs through the API (a real sandbox lifecycle)",
    "sync/env_vars/test_bash.py::test_env_vars_overwrite":
        "creates a sandbox with envs through the API (a real sandbox lifecycle)",
    "async/env_vars/test_python.py::test_env_vars_on_sandbox":
        "creates a sandbox with envs through the API (a real sandbox lifecycle)",
    "async/env_vars/test_python.py::test_env_vars_overwrite":
        "creates a sandbox with envs through the API (a real sandbox lifecycle)",
    "async/env_vars/test_bash.py::test_env_vars_on_sandbox":
        "creates a sandbox with envs through the API (a real sandbox lifecycle)",
    "async/env_vars/test_bash.py::test_env_vars_overwrite":
        "creates a sandbox with envs through the API (a real sandbox lifecycle)",
    "sync/env_vars/test_js.py": "JavaScript kernel: stasis contexts are python and bash",
    "sync/env_vars/test_r.py": "R kernel: stasis contexts are python and bash",
    "sync/env_vars/test_java.py": "Java kernel: stasis contexts are python and bash",
    "async/env_vars/test_js.py": "JavaScript kernel: stasis contexts are python and bash",
    "async/env_vars/test_r.py": "R kernel: stasis contexts are python and bash",
    "async/env_vars/test_java.py": "Java kernel: stasis contexts are python and bash",
    "sync/test_default_kernels.py": "js/ts/r/java kernels: stasis contexts are python and bash",
    "async/test_async_default_kernels.py": "js/ts/r/java kernels: stasis contexts are python and bash",
    "languages/test_deno.py": "Deno kernel: stasis contexts are python and bash (the SDK skips these too)",
    "test_legacy_compat.py": "SDK-internal unit tests of its legacy-domain dispatch, not of the interpreter; "
                             "in 2.1.1 they reach the real novita.ai API over the network",
    "benchmarking.py": "a timing script that creates real sandboxes, not a test module",
}

# skip_debug tests that apply here (each test file gets a fresh server, so a
# fresh kernel, as a new sandbox would have): run them.
RUN_DESPITE_SKIP_DEBUG = {
    "sync/test_execution_count.py::test_execution_count",
    "async/test_async_execution_count.py::test_execution_count",
}


def sdk_tests_dir() -> str:
    import novita_sandbox.code_interpreter as ci
    return os.path.join(os.path.dirname(os.path.abspath(ci.__file__)), "tests")


TESTS = sdk_tests_dir()


def _deselect_reason(rel: str):
    for key, reason in DESELECTED.items():
        if rel == key or rel.startswith(key + "::"):
            return reason
    return None


# --- the plugin ----------------------------------------------------------------

def pytest_configure(config):
    config.addinivalue_line("markers", "skip_debug: the SDK's mark for tests that need a real sandbox")


def pytest_ignore_collect(collection_path, config):
    rel = os.path.relpath(str(collection_path), TESTS)
    if rel == "benchmarking.py":
        # Importing it creates sandboxes: it is a script, not a test module.
        return True
    return None


def pytest_collection_modifyitems(session, config, items):
    keep, dropped = [], []
    for item in items:
        rel = item.nodeid  # relative to the SDK's tests directory (--rootdir)
        if _deselect_reason(rel):
            dropped.append(item)
            continue
        if rel in RUN_DESPITE_SKIP_DEBUG:
            item.own_markers = [m for m in item.own_markers if m.name != "skip_debug"]
        keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep


@pytest.fixture(scope="module", autouse=True)
def stasis_interpreter_server():
    """A fresh interpreter server on localhost:49999 for each test file (its
    log shown only when it reports a problem)."""
    with interpreter_server("stasis-sdk-suite-",
                            show_log=lambda text: "Traceback" in text or "failed" in text,
                            remove_home=True):
        yield


# --- the script -------------------------------------------------------------------

def main(argv) -> int:
    os.environ["NOVITA_DEBUG"] = "1"
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.dont_write_bytecode = True
    bar = "=" * 78
    print(bar)
    print(f"SDK suite: {TESTS}")
    print(f"DESELECTED ({len(DESELECTED)} entries; they cannot apply to a host-run interpreter server):")
    for key, reason in DESELECTED.items():
        print(f"  - {key}: {reason}")
    print("RUN DESPITE skip_debug: " + ", ".join(sorted(RUN_DESPITE_SKIP_DEBUG)))
    print(bar, flush=True)
    # (anyio, a pytest plugin, is imported with the SDK before pytest starts.)
    # --import-mode=importlib: the SDK's test files share basenames
    # (sync/env_vars/test_bash.py, async/env_vars/test_bash.py, ...).
    args = [TESTS, "-q", "-p", "no:cacheprovider", "--import-mode=importlib", "--rootdir", TESTS,
            "-W", "ignore::pytest.PytestAssertRewriteWarning",
            "-o", "asyncio_mode=auto", "-o", "asyncio_default_fixture_loop_scope=function", *argv]
    return pytest.main(args, plugins=[sys.modules[__name__]])


if __name__ == "__main__":
    sys.modules.setdefault("sdk_suite", sys.modules["__main__"])
    sys.exit(main(sys.argv[1:]))
