"""Shared fixtures. Hub tests talk to `hub_server.HubServer` on 127.0.0.1, never to huggingface.co.

huggingface_hub reads HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE, ... once, when it is imported, into
`huggingface_hub.constants` (the module-level `huggingface_hub.create_repo`, `upload_folder`, ... are
bound to an `HfApi` built at import too). So this file binds the server's port and sets those
variables *before* anything imports huggingface_hub, for the whole session:

- HF_ENDPOINT is the test server (`constants.ENDPOINT`, the resolve-URL template and the list of
  trusted hosts follow from it); the import-time check below refuses to run if it did not take.
- HF_HOME is a session temporary directory, and the token variables are removed, so no token or
  cache from the machine is used. Telemetry, update checks and progress bars are off.
- huggingface_hub's HTTP client is replaced (`set_client_factory`, its supported hook) by one that
  refuses any request not addressed to 127.0.0.1 before it is sent.

The `hub` fixture then gives each test an empty server and its own cache and token paths, by setting
the attributes of `huggingface_hub.constants` that the library reads at call time.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch
from hub_server import HubServer

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_CLEARED_VARS = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_TOKEN_PATH",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_ASSETS_CACHE",
    "HUGGINGFACE_ASSETS_CACHE",
    "HF_XET_CACHE",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HUGGINGFACE_CO_STAGING",
    "HF_OIDC_RESOURCE",
    "HF_OIDC_ID_TOKEN",
)

_SERVER = HubServer()  # bound now, so that the endpoint is known; serving starts with `hub_server`
_HF_HOME = tempfile.mkdtemp(prefix="tinydiff-hf-home-")


def _clean_up() -> None:
    _SERVER.stop()
    shutil.rmtree(_HF_HOME, ignore_errors=True)


def _point_huggingface_hub_at(endpoint: str) -> None:
    for name in _CLEARED_VARS:
        os.environ.pop(name, None)
    os.environ.update(
        HF_ENDPOINT=endpoint,
        HF_HOME=_HF_HOME,
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_UPDATE_CHECK="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
    )
    import httpx2
    import huggingface_hub
    from huggingface_hub import constants

    if constants.ENDPOINT != endpoint or constants.HF_HOME != _HF_HOME:
        _clean_up()  # pytest_unconfigure will not: this conftest never finishes loading
        raise pytest.UsageError(
            "huggingface_hub was imported before tests/conftest.py could point it at the test hub "
            f"server (its endpoint is {constants.ENDPOINT!r}, expected {endpoint!r}). Find what imports "
            "huggingface_hub during pytest start-up (a plugin?) and keep it from doing so."
        )

    def refuse_non_loopback(request: httpx2.Request) -> None:
        if request.url.host not in LOOPBACK:
            raise RuntimeError(f"Tests may only reach the local test hub server, not {request.url}")

    # The library's own request hooks (offline mode, request ids) are kept, the guard runs first.
    huggingface_hub.close_session()
    library_hooks = list(huggingface_hub.get_session().event_hooks["request"])
    huggingface_hub.close_session()
    huggingface_hub.set_client_factory(
        lambda: httpx2.Client(
            event_hooks={"request": [refuse_non_loopback, *library_hooks]},
            follow_redirects=True,
            timeout=60,
        )
    )


_point_huggingface_hub_at(_SERVER.endpoint)


def pytest_unconfigure(config: pytest.Config) -> None:
    _clean_up()


@pytest.fixture(scope="session")
def hub_server() -> Iterator[HubServer]:
    """The session's Hub-compatible server: `.endpoint`, `.token` (valid), `.user` (its owner)."""
    from huggingface_hub import constants

    assert urlsplit(_SERVER.endpoint).hostname in LOOPBACK
    assert constants.ENDPOINT == _SERVER.endpoint
    _SERVER.start()
    yield _SERVER
    _SERVER.stop()


@pytest.fixture
def hub(hub_server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    """`hub_server`, emptied, with this test's own HF_HOME (cache, token file) and online mode.

    Sets both `huggingface_hub.constants` (read by the library at call time) and the environment
    (inherited by subprocesses). `scan_cache_dir()` without arguments still looks at the session's
    HF_HOME: huggingface_hub copies that default at import.
    """
    from huggingface_hub import constants

    hub_server.reset()
    home = tmp_path / "hf_home"
    paths = {
        "HF_HOME": home,
        "HF_HUB_CACHE": home / "hub",
        "HF_ASSETS_CACHE": home / "assets",
        "HF_XET_CACHE": home / "xet",
        "HF_TOKEN_PATH": home / "token",
    }
    for name, path in paths.items():
        monkeypatch.setattr(constants, name, str(path))
        monkeypatch.setenv(name, str(path))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    return hub_server


# Under pytest-xdist each worker gets one intra-op thread: two workers with two OpenMP threads
# each on a 2-core machine oversubscribe the cores and small-network tests slow down ~30x.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same global RNG state."""
    torch.manual_seed(0)
