"""`knowbench submit` from several processes at the same moment on one leaderboard folder.

Eight real processes, each running the command line's ``submit`` on its own file, are released
together (each imports knowbench first, says it is ready, then waits for a gate file), with a mix
of distinct run keys, a run key that differs only in its data file, and duplicates (the same file
twice, the same file under another name, the same key with other numbers). Whatever the order
they get the lock in: nothing is lost, every duplicate is refused with a message and a non-zero
exit, the exit codes agree with what is stored, and README.md / index.html match the stored files.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

from kb_results import make_result, reseal

from knowbench.leaderboard import load_entries, relative_path, stale_outputs

CHILD = """
import sys, time
from pathlib import Path
from knowbench.cli import main
gate, ready, args = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
ready.touch()
deadline = time.monotonic() + 120
while not gate.exists():
    if time.monotonic() > deadline:
        sys.exit("the gate never opened")
    time.sleep(0.001)
sys.exit(main(args))
"""


def _other_data(result: dict, name: str) -> dict:
    result["task"]["data_files"] = [{"path": f"/data/{name}", "sha256": hashlib.sha256(name.encode()).hexdigest()}]
    return reseal(result)


def test_concurrent_submits_lose_nothing_and_refuse_duplicates(tmp_path):
    lb = tmp_path / "lb"
    inputs = tmp_path / "in"
    inputs.mkdir()
    a = make_result(editor="ft-m")
    seq = make_result(editor="memit", protocol="sequential", n_edits=6, post={"edit_succ": 40.0, "locality": 20.0})
    results = {
        "a": a,
        "a_real_data": _other_data(make_result(editor="ft-m", post={"edit_succ": 50.0}), "ZsRE-test-all.json"),
        "rome": make_result(editor="rome"),
        "rome_other_numbers": make_result(editor="rome", post={"edit_succ": 12.0}),
        "ft_m_n8": make_result(editor="ft-m", n_edits=8, post={"edit_succ": 60.0}),
        "seq": seq,
    }
    for name, r in results.items():
        (inputs / f"{name}.json").write_text(json.dumps(r, indent=1))
    (inputs / "seq_copy.json").write_text(json.dumps(seq))  # the same result under another name
    # writer -> the file it submits; "a" twice (the same file at the same moment)
    writers = ["a", "a", "a_real_data", "rome", "rome_other_numbers", "ft_m_n8", "seq", "seq_copy"]
    # the run keys: writers in one group compete for one stored file, exactly one of them wins
    groups = [[0, 1], [2], [3, 4], [5], [6, 7]]

    gate = tmp_path / "gate"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KNOWBENCH_PROGRESS": "0"}
    procs = []
    for i, name in enumerate(writers):
        args = ["submit", str(inputs / f"{name}.json"), "--leaderboard", str(lb), "--lock-timeout", "120"]
        procs.append(subprocess.Popen([sys.executable, "-c", CHILD, str(gate), str(tmp_path / f"ready{i}"), *args],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    deadline = time.monotonic() + 180
    while not all((tmp_path / f"ready{i}").exists() for i in range(len(writers))):
        assert time.monotonic() < deadline, "writers did not start"
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.01)
    gate.touch()  # all eight go
    outs = [p.communicate(timeout=300) for p in procs]
    codes = [p.returncode for p in procs]
    report = "\n".join(f"writer {i} ({writers[i]}): rc {c}\n{o}{e}" for i, (c, (o, e)) in enumerate(zip(codes, outs)))
    for out, err in outs:
        assert "Traceback" not in out + err, report
    assert set(codes) <= {0, 1}, report

    submitted = {name: json.loads((inputs / f"{name}.json").read_text()) for name in set(writers)}
    stored_paths = {}
    for group in groups:
        winners = [i for i in group if codes[i] == 0]
        assert len(winners) == 1, f"group {[writers[i] for i in group]}: {len(winners)} accepted\n{report}"
        w = winners[0]
        result = submitted[writers[w]]
        path = lb / relative_path(result)
        stored_paths[path] = result
        # the winner said "added" for that path, and that path holds the winner's file
        assert f"added {path}" in outs[w][0], report
        stored = json.loads(path.read_text())
        assert stored["integrity"]["sha256"] == result["integrity"]["sha256"], report
        for i in group:
            if i != w:  # every loser: refused with a reason, nothing claimed
                out = outs[i][0]
                assert "added" not in out and "already on the leaderboard" in out, report
                same = submitted[writers[i]]["integrity"]["sha256"] == result["integrity"]["sha256"]
                assert ("this exact result is" if same else "a result for the same run key is") in out, report

    # nothing lost, nothing extra, no temporary file left behind
    entries = load_entries(lb)
    assert {lb / e.path for e in entries} == set(stored_paths), report
    assert len(entries) == 5
    assert not [p for p in (lb / "results").rglob("*") if p.is_file() and p.suffix != ".json"]
    # the generated files were regenerated from exactly these five files
    assert stale_outputs(lb) == []
    readme = (lb / "README.md").read_text()
    assert "5 result files." in readme
    html = (lb / "index.html").read_text()
    for path in stored_paths:
        assert path.relative_to(lb).as_posix() in html
