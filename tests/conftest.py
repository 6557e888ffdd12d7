"""Shared fixtures: where the real corpus is, the exported model zoo, the oracles."""

from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `models` and `tests` import from the repo root
# Ray reads its authentication settings once, when imported: every Ray process of the session (the
# local cluster of tests/test_ray.py, the CLI runs joining it) shares one token made here
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
CORPUS = Path(os.environ.get("SPA_CORPUS", ROOT.parent / "shared" / "corpus" / "real"))


def corpus_entries() -> list[dict]:
    """MANIFEST.json entries of the real corpus ([] when ../shared is absent)."""
    manifest = CORPUS / "MANIFEST.json"
    if not manifest.is_file():
        return []
    return json.loads(manifest.read_text())["files"]


def corpus_params(slow: tuple = ()):
    """One param per corpus entry; files containing any of `slow` are marked slow."""
    entries = corpus_entries()
    if not entries:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"corpus not found at {CORPUS}"))]
    return [pytest.param(e, id=e["file"], marks=[pytest.mark.slow] if any(s in e["file"] for s in slow) else [])
            for e in entries]


ZOO_EXPORTERS = ("torchscript", "dynamo")


def export_zoo(zoo_module, out: Path) -> dict:
    """{(name, exporter): path} of every model of a models/ zoo, with both exporters."""
    paths = {}
    for name in zoo_module.BUILDERS:
        for exporter in ZOO_EXPORTERS:
            path = out / f"{name}.{exporter}.onnx"
            zoo_module.export(name, path, exporter=exporter)
            paths[(name, exporter)] = path
    return paths


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    """{(name, exporter): path} of every models/ CNN, exported once per session."""
    pytest.importorskip("torch")
    from models import cnn_zoo

    return export_zoo(cnn_zoo, tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """{(name, exporter): path} of every models/hf_zoo.py model, exported once per session."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from models import hf_zoo

    return export_zoo(hf_zoo, tmp_path_factory.mktemp("hfzoo"))
