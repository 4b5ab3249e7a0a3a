from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from haystack_integrations.common.multimodal_rag.backends.loading import (
    LoadSpec,
    checkpoint_fingerprint,
    looks_like_local_path,
    preflight,
)
from haystack_integrations.common.multimodal_rag.errors import ModelLoadError
from haystack_integrations.components.embedders.multimodal import MultimodalTextEmbedder
from haystack_integrations.testing.multimodal_rag.tiny_models import build_tiny_siglip

REPO = Path(__file__).resolve().parents[1]


def test_checkpoint_fingerprint_follows_the_weights_not_the_folder(tmp_path: Path) -> None:
    first = build_tiny_siglip(tmp_path / "first", seed=0)
    other = build_tiny_siglip(tmp_path / "other", seed=1)
    moved = tmp_path / "moved"
    shutil.copytree(first, moved)
    assert checkpoint_fingerprint(str(first)).startswith("sha256:")
    assert checkpoint_fingerprint(str(first)) == checkpoint_fingerprint(str(moved))
    assert checkpoint_fingerprint(str(first)) != checkpoint_fingerprint(str(other))


def test_an_adapters_fingerprint_names_its_base_by_content_not_by_path(tmp_path: Path) -> None:
    base = build_tiny_siglip(tmp_path / "base", seed=0)
    other_base = build_tiny_siglip(tmp_path / "other-base", seed=1)

    def adapter(folder: Path, base_path: Path, weights: bytes = b"lora") -> str:
        folder.mkdir(parents=True)
        config = {"base_model_name_or_path": str(base_path), "peft_type": "LORA", "r": 4}
        (folder / "adapter_config.json").write_text(json.dumps(config))
        (folder / "adapter_model.safetensors").write_bytes(weights)
        return str(folder)

    first = checkpoint_fingerprint(adapter(tmp_path / "adapter", base))
    assert first.startswith("sha256:")
    moved_base = shutil.copytree(base, tmp_path / "moved" / "base")
    assert checkpoint_fingerprint(adapter(tmp_path / "moved" / "adapter", moved_base)) == first
    assert checkpoint_fingerprint(adapter(tmp_path / "on-other-base", other_base)) != first
    assert checkpoint_fingerprint(adapter(tmp_path / "other-weights", base, b"other")) != first


def test_checkpoint_fingerprint_of_an_unknown_id_falls_back_to_the_id() -> None:
    assert checkpoint_fingerprint("no-such-org/no-such-model") == "id:no-such-org/no-such-model"


def test_processor_kwargs_are_part_of_the_loaded_model_identity() -> None:
    base = {"model": "m", "component": "C", "device": "cpu", "token": None, "local_files_only": True}
    plain = LoadSpec(**base, model_kwargs=None)
    budget = LoadSpec(**base, model_kwargs=None, processor_kwargs={"max_pixels": 1000})
    assert plain.cache_key() != budget.cache_key()


# --- Fail fast when the model cannot be found (issue 12, item 9) ---------------------------------------------------

_LOAD_IN_CHILD = textwrap.dedent(
    """
    import json, sys, time
    from haystack_integrations.common.multimodal_rag.errors import ModelLoadError
    from haystack_integrations.components.embedders.multimodal import MultimodalTextEmbedder

    embedder = MultimodalTextEmbedder(model=sys.argv[1])
    start = time.monotonic()
    try:
        embedder.warm_up()
        result = {"loaded": True, "dim": len(embedder.run(text="a chart")["embedding"])}
    except ModelLoadError as e:
        result = {"loaded": False, "message": str(e)}
    result["elapsed_s"] = time.monotonic() - start
    print("RESULT " + json.dumps(result), flush=True)
    """
)


@pytest.fixture
def silent_hub() -> Iterator[str]:
    """An HTTP endpoint on 127.0.0.1 that accepts connections and never answers (stops itself after 180 s)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    stop = threading.Event()
    held: list[socket.socket] = []
    deadline = time.monotonic() + 180

    def serve() -> None:
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in held:
            conn.close()
        server.close()


def _load_in_child(model: str, *, endpoint: str, hf_home: Path) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(hf_home), HAYSTACK_TELEMETRY_ENABLED="False")
    out = subprocess.run(
        [sys.executable, "-c", _LOAD_IN_CHILD, model],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(lines) == 1, out.stdout[-3000:]
    return json.loads(lines[0].removeprefix("RESULT ")), out.stderr


def test_an_unanswering_hub_fails_the_first_load_fast_in_one_line(silent_hub: str, tmp_path: Path) -> None:
    result, stderr = _load_in_child("google/siglip-so400m-patch14-384", endpoint=silent_hub, hf_home=tmp_path)
    assert result["loaded"] is False
    message = result["message"]
    assert len(message.splitlines()) == 1
    assert "'google/siglip-so400m-patch14-384'" in message
    assert silent_hub in message
    assert "did not answer" in message
    assert "HF_ENDPOINT" in message
    assert "local directory" in message
    assert "Retry" not in stderr
    # The one timing assertion of the suite: generous for a loaded machine (the probe waits 10 s).
    assert result["elapsed_s"] < 60


@pytest.mark.slow
def test_an_unanswering_hub_falls_back_to_a_cached_model(silent_hub: str, tmp_path: Path, tiny_siglip: str) -> None:
    # The Hugging Face cache layout: hub/models--org--name/{refs/main, snapshots/<commit>/...}.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-siglip"
    shutil.copytree(tiny_siglip, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    result, stderr = _load_in_child("tiny-org/tiny-siglip", endpoint=silent_hub, hf_home=tmp_path)
    assert result["loaded"] is True, result
    assert result["dim"] == 32
    assert "did not answer" in stderr
    assert "from the local cache" in stderr
    assert "Retry" not in stderr


@pytest.mark.parametrize("model", ["/no/such/checkpoint", "./models/missing", "org/name/extra"])
def test_a_missing_local_model_path_says_no_such_directory(model: str) -> None:
    spec = LoadSpec(model=model, component="Probe", device="cpu", token=None, local_files_only=False, model_kwargs=None)
    with pytest.raises(ModelLoadError, match="no such directory") as info:
        preflight(spec)
    assert f"'{model}'" in str(info.value)
    assert "Repo id" not in str(info.value)


def test_a_missing_model_directory_fails_the_component_warm_up_with_its_name(tmp_path: Path) -> None:
    embedder = MultimodalTextEmbedder(model=str(tmp_path / "not-built-yet"))
    with pytest.raises(ModelLoadError, match=r"MultimodalTextEmbedder could not load .* no such directory"):
        embedder.warm_up()


def test_a_hub_id_is_not_mistaken_for_a_path() -> None:
    assert not looks_like_local_path("google/siglip-so400m-patch14-384")
    assert not looks_like_local_path("gpt2")
    assert looks_like_local_path("~/models/siglip")
    assert looks_like_local_path("/models/siglip")
