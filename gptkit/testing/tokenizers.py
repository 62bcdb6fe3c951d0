"""The properties every tokenizer must have: torch-free, decode(encode(x)) == x on text it was
fitted on (without the rare characters a frequency-cut vocabulary sends to ``unk_id``), and the
same ids after save and load."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def check_torch_free(module: str) -> None:
    """Import ``module`` in a fresh interpreter where torch cannot be imported."""
    import os
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class _NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is blocked: this module must be torch-free')\n"
        "sys.meta_path.insert(0, _NoTorch())\n"
        f"import {module}\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, (
        f"module {module} must import without torch (bundles load it without torch); import "
        f"torch inside build() instead:\n{result.stderr.strip()[-2000:]}"
    )


def modules_of(registry: Any, case: Any) -> list[str]:
    reg = registry.components[case.slot][case.kind]
    info = registry.pm.info(reg.provider)
    return sorted({reg.cls.__module__, *([info.module] if info and info.module else [])})


def sample_text() -> str:
    """About 20,000 characters of Tiny Shakespeare, the text tokenizers are fitted on."""
    import gzip
    from pathlib import Path

    path = Path(__file__).parents[1] / "corpora" / "tinyshakespeare.txt.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return f.read(20_000)


def run_tokenizer_case(case: Any, example: Any, registry: Any, folder: Path) -> None:
    if case.prop == "torch_free":
        for module in modules_of(registry, case):
            check_torch_free(module)
        return
    text = sample_text()
    tok = example.build()
    tok.fit(text)
    assert isinstance(tok.vocab_size, int) and tok.vocab_size > 0, "vocab_size must be set"
    assert 0 <= tok.eot_id < tok.vocab_size, f"eot_id {tok.eot_id} outside the vocabulary"
    # Whole lines of the fitted text: covered by any vocabulary fitted on it (a slice cut
    # mid-word could hold a word the fitted vocabulary never saw).
    lines = text.splitlines(keepends=True)[:-1]
    pieces = ["".join(lines[:40]), "".join(lines[200:230]), "".join(lines[-20:]), lines[3]]
    pieces.append(_spacing(lines))
    if case.prop == "roundtrip":
        for piece in pieces[:-1]:
            check_roundtrip(tok, piece)
        # its whitespace runs are not in the fitted text: a vocabulary cut by frequency may
        # send them all to unk_id, but what it keeps must come back exactly
        check_roundtrip(tok, pieces[-1], max_unknown=1.0)
        check_unseen(tok)
    elif case.prop == "save_load":
        from gptkit.components.tokenizers import load_tokenizer

        refitted = example.build()
        refitted.fit(text)
        assert all(refitted.encode(p) == tok.encode(p) for p in pieces), (
            "fitted twice on the same text it encodes differently: fit() must be "
            "deterministic (runs that fit their own tokenizer, repeats and sweeps, compare)"
        )

        try:
            tok.save(folder / "tokenizer")
        except TypeError as exc:  # json.dumps of a state that is not JSON
            raise AssertionError(f"save() failed: state() must be plain JSON data ({exc})") from exc
        again = load_tokenizer(folder / "tokenizer", registry)
        assert (again.vocab_size, again.eot_id) == (tok.vocab_size, tok.eot_id), (
            f"a reloaded tokenizer has vocab_size {again.vocab_size} and eot_id {again.eot_id}, "
            f"the saved one {tok.vocab_size} and {tok.eot_id} (load_state restores the state)"
        )
        for piece in pieces:
            assert again.encode(piece) == tok.encode(piece), (
                "a reloaded tokenizer encodes differently"
            )


def _spacing(lines: list[str]) -> str:
    """The fitted text's own words with the spacing it rarely has: runs of spaces, blank
    lines, spaces before a newline and at the start, no final newline (a decode that
    collapses or trims whitespace passes on ordinary lines)."""
    words = "".join(lines[:40]).split()
    return (
        "  " + "  ".join(words[:6]) + "\n\n\n" + "   ".join(words[6:12]) + "  \n"
        + " ".join(words[12:18]) + "\n \n" + "    " + words[18]
    )  # fmt: skip


MAX_UNKNOWN = 0.1  # the share of fitted text a vocabulary may leave to unk_id
FITTED = "text the tokenizer was fitted on"


# Characters the fitted text (Tiny Shakespeare) does not have: accents, typographic
# punctuation, CJK, an emoji.
UNSEEN = "Zo\u00eb\u2019s caf\u00e9 \u2014 \u6771\u4eac \U0001f642"


def check_unseen(tok: Any) -> None:
    """Text outside the fitted vocabulary is refused (an exception: gptkit names it to the
    user) or encodes exactly, rare runs to ``unk_id`` allowed; never silently shortened."""
    import unicodedata

    try:
        ids = tok.encode(UNSEEN)
    except Exception:
        return  # refused (gptkit names any exception from encode to the user)
    if unicodedata.normalize("NFC", tok.decode(ids)) == UNSEEN:
        return  # back as it was, or canonically equivalent (a tokenizer normalising to NFD)
    check_roundtrip(tok, UNSEEN, 1.0, "text it never saw (refuse it, or give it back exactly)")


def check_roundtrip(
    tok: Any, piece: str, max_unknown: float = MAX_UNKNOWN, what: str = FITTED
) -> None:
    """decode(encode(x)) == x on fitted text. A tokenizer with an ``unk_id`` (a vocabulary cut
    by frequency) may send rare text to it: each ``unk_id`` then stands for a non-empty run of
    the text, everything between them must come back exactly, and the unknown runs must be
    rare (at most ``max_unknown`` of the text)."""
    import re

    ids = tok.encode(piece)
    assert all(0 <= i < tok.vocab_size for i in ids), "encode gave ids outside the vocab"
    assert tok.eot_id not in ids, (
        f"encode gave the end-of-text id {tok.eot_id} for ordinary text ({piece[:30]!r}): "
        "a generation would stop wherever that text comes; eot_id must be an id of its own"
    )
    unk = getattr(tok, "unk_id", None)
    if unk is None:
        back = tok.decode(ids)
        assert back == piece, (
            f"decode(encode(x)) != x for {what}: {piece[:60]!r} came back as {back[:60]!r}"
        )
        return
    assert isinstance(unk, int) and 0 <= unk < tok.vocab_size, f"unk_id {unk!r} outside the vocab"
    runs: list[list[int]] = [[]]
    for i in ids:
        runs.append([]) if i == unk else runs[-1].append(i)
    known = [tok.decode(run) for run in runs]
    match = re.fullmatch("(.+?)".join(map(re.escape, known)), piece, re.DOTALL)
    assert match is not None, (
        f"decode(encode(x)) != x for {what}, outside the parts sent to "
        f"unk_id: {piece[:60]!r} came back as {'<unk>'.join(known)[:60]!r}"
    )
    share = sum(len(g) for g in match.groups()) / max(1, len(piece))
    assert share <= max_unknown, (
        f"{share:.1%} of the text it was fitted on encodes to unk_id (at most "
        f"{max_unknown:.0%}): the vocabulary leaves out common text"
    )
