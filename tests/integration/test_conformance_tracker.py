"""Conformance: the captured real mogilefsd 2.73 / mogstored exchanges, replayed against the dev MogileFS.

Every exchange of ``tests/data/mogile-wire/all.jsonl`` (files 01 to 12, in capture order, on one
tracker connection per recorded ``conn``) is sent again, after the steps the transcripts record
off the wire (unrecorded uploads, stopping and restarting a storage node). Transcript devices
(ports 7500/7502, devids 1/2) are mapped to ours per fid; fids are compared as they are.

Compared: ERR lines byte for byte (code, text, callid); OK lines by their set of argument names
and every value (list order ignored only where the real tracker's is random: paths, classes of
get_domains, hosts, devices); HTTP replies by version, status, reason, body and the headers
Content-Type, Content-Length, Content-Range, Accept-Ranges, Connection and Keep-Alive; an empty
reply means nothing may arrive within 0.3 s.
"""

from __future__ import annotations

from integration._wire_replay import Divergence, Replayer, load_exchanges

from mogile_middleware.devserver import DevMogileFS

#: Exchanges where the embedded tracker knowingly differs from the real one, by exchange number.
#: Nothing else is skipped or relaxed.
DIVERGENCES: dict[int, Divergence] = {
    6: Divergence(
        "get_devices",
        "values",
        "disk figures come from each node's usage file, of another disk than the lab's",
        r"dev\d+_mb_(total|used|free)",
    ),
    23: Divergence(
        "admin command !stats (handled by the parent process, multi-line, ends with '.')",
        "skip",
        "process statistics: other lines and values (mogilefsd has worker pools, the embedded tracker threads)",
    ),
    43: Divergence(
        "[wrong size] GET the uploaded path afterwards (file deleted?)",
        "skip",
        "mogilefsd deletes a rejected upload later in the background (200 here); the embedded tracker at once (404)",
    ),
    45: Divergence(
        "[no PUT] create_close without uploading",
        "prefix",
        "the text ends with the tracker's last internal error message, unrelated to the request",
        "%3B+error:",
    ),
    70: Divergence(
        "get_paths right after create_close (not yet replicated)",
        "replicated",
        "mogilefsd replicates in the background (1 path right after create_close); the embedded tracker "
        "replicates before answering create_close, so both copies are there",
    ),
    113: Divergence(
        "list_keys prefix 'lk/a.' with after (regex dot)",
        "skip",
        "mogilefsd matches the after-value against the prefix as a regex; the embedded tracker matches it "
        "literally (a client's regex could stall the tracker)",
    ),
    238: Divergence(
        "GET /dev1/usage (disk usage file the tracker monitor reads)",
        "skip",
        "the figures are of another disk (the file's format: test_devserver_admin.py)",
    ),
    263: Divergence(
        "create_open with debug_profile=1",
        "names",
        "no profiling points (prof_*) are reported",
        r"prof.*",
    ),
    270: Divergence(
        "get_devices 8s after stop",
        "values",
        "disk figures, as for exchange 6",
        r"dev\d+_mb_(total|used|free)",
    ),
}


def test_transcripts_are_complete() -> None:
    exchanges = load_exchanges()
    assert [exchange.n for exchange in exchanges] == list(range(1, len(exchanges) + 1))
    assert {exchange.file[:2] for exchange in exchanges} == {f"{number:02d}" for number in range(1, 13)}
    notes = [note for exchange in exchanges for note in exchange.notes]
    assert sum("unrecorded)" in note and note.startswith("# (PUT") for note in notes) == 12
    assert sum(note.startswith("# stopped mogstored") for note in notes) == 1
    for n, divergence in DIVERGENCES.items():
        assert exchanges[n - 1].title == divergence.title, n


def test_replayed_transcripts_match_the_real_tracker(devmogile: DevMogileFS) -> None:
    exchanges = load_exchanges()
    replayer = Replayer(devmogile, DIVERGENCES)
    try:
        replayer.run(exchanges)
    finally:
        replayer.close()
    assert not replayer.mismatches, "\n".join(replayer.mismatches)
    assert replayer.compared >= len(exchanges) - len(DIVERGENCES)
