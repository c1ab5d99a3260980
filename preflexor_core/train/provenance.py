"""What each artefact of a run directory was built from: a corpus fingerprint and its settings.

``retriever/`` and ``tokenizer/`` carry ``built_from.json``: the corpus (file names relative to the
corpus root, sizes, SHA-256 of each and of the whole) and the settings that shaped them (embedder,
vocabulary size). A later run reuses an artefact only when both match; on a mismatch it is rebuilt,
unless something in the run directory was made from it (pairs, stage outputs, checkpoints): then
the run is refused, naming what differs. An artefact without a record (a build that did not
finish, or an older run) is rebuilt when nothing depends on it, else reused with a warning.

Tests: ``python -m pytest -q tests/test_reliability_train.py -k provenance``
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

from ..infra.errors import PreflexorError
from ..infra.io import fsync_write
from ..retrieval.chunking import iter_corpus_files

log = logging.getLogger("preflexor.train")

__all__ = ["BUILT_FROM", "ArtefactMismatchError", "corpus_fingerprint", "built_from", "write_built_from",
           "reuse_artefact"]

BUILT_FROM = "built_from.json"


class ArtefactMismatchError(PreflexorError, ValueError):
    """A run-dir artefact built from other inputs, with results that depend on it."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def corpus_fingerprint(paths) -> dict:
    """``{"files": [[name, size, sha256], ...], "sha256": ...}`` of corpus files / folders (the files
    the corpus reader takes from a folder, named relative to it)."""
    files = []
    for p in map(Path, paths):
        items = [(f, f.relative_to(p).as_posix()) for f in iter_corpus_files(p)] if p.is_dir() else [(p, p.name)]
        files += [[name, f.stat().st_size, _sha256(f)] for f, name in items]
    whole = hashlib.sha256(json.dumps(files).encode()).hexdigest()
    return {"files": files, "sha256": whole}


def built_from(corpus: dict, **settings) -> dict:
    return {"corpus": corpus, "settings": settings}


def write_built_from(folder, record: dict) -> None:
    fsync_write(str(Path(folder) / BUILT_FROM), json.dumps(record, indent=1) + "\n")


def _read(folder: Path) -> dict | None:
    try:
        return json.loads((folder / BUILT_FROM).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _describe(old: dict, new: dict) -> str:
    parts = []
    oc, nc = old.get("corpus", {}), new["corpus"]
    if oc.get("sha256") != nc["sha256"]:
        def short(c):
            names = [f[0] for f in c.get("files", [])]
            return f"{len(names)} file(s) {', '.join(names[:3])}{' ...' if len(names) > 3 else ''} " \
                   f"(sha256 {str(c.get('sha256', '?'))[:12]})"
        parts.append(f"corpus {short(oc)} -> {short(nc)}")
    for k in sorted(set(old.get("settings", {})) | set(new["settings"])):
        a, b = old.get("settings", {}).get(k), new["settings"].get(k)
        if a != b:
            parts.append(f"{k} {a!r} -> {b!r}")
    return "; ".join(parts)


def reuse_artefact(folder: Path, complete: bool, record: dict, dependents, what: str) -> bool:
    """True: the complete artefact in ``folder`` was built from ``record``'s inputs, reuse it. False:
    (re)build it. Raises ``ArtefactMismatchError`` when it differs and ``dependents`` (paths made from
    it) exist. Read-only, so every rank can call it."""
    if not complete:
        return False
    saved = _read(folder)
    if saved is not None and saved.get("corpus", {}).get("files") == record["corpus"]["files"] \
            and saved.get("settings") == record["settings"]:
        return True
    deps = [str(d) for d in dependents if Path(d).exists()]
    if saved is None:
        if deps:
            log.warning("%s has no %s (made by an older version?); reusing it for %s", folder, BUILT_FROM,
                        ", ".join(deps))
            return True
        log.info("%s has no %s (an unfinished build?); rebuilding the %s", folder, BUILT_FROM, what)
        return False
    diff = _describe(saved, record)
    if deps:
        raise ArtefactMismatchError(
            f"{folder} (the {what}) was built from other inputs than this run's: {diff}; {', '.join(deps)} "
            f"were made from it. Use a new --out, or remove {folder} and {', '.join(deps)} to rebuild from "
            f"the new inputs")
    log.info("%s was built from other inputs (%s); rebuilding the %s", folder, diff, what)
    return False


def datagen_seed(seed: int, stage: str, iteration: int) -> int:
    """The pair generator's seed for (run seed, stage, iteration): an injective map (stage < 8,
    0 <= iteration < 2**32), so no two stages or iterations of a run share a seed."""
    if not 0 <= iteration < 2**32:
        raise ValueError(f"iteration {iteration} out of range [0, 2**32)")
    return ((int(seed) * 8 + int(stage)) << 32) + iteration


def settings_hash(cfg, sampling, stage: str) -> str:
    """10 hex digits of sha256 over the sampling and teacher settings that shape a stage's pairs."""
    d = cfg.data
    keys = ("teacher", "teacher_model", "teacher_max_items", "teacher_answer_sentences", "embedder",
            "number_nodes_to_get", "k_samples", "corpus")
    blob = {"stage": stage, "seed": cfg.run.seed, "sampling": dataclasses.asdict(sampling),
            **{k: getattr(d, k) for k in keys}}
    if d.decode_weights != "fp":            # only then (and under its first name): older hashes stay valid
        blob["sample_weights"] = d.decode_weights
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:10]


def pair_id_prefix(meta: dict) -> str:
    """Row ids ``s{stage}-i{iteration}-p{policy_step}-{settings_hash}-{index}``: unique per provenance."""
    return f"s{meta['stage']}-i{meta['iteration']}-p{meta['policy_step']}-{meta['settings_hash']}"
