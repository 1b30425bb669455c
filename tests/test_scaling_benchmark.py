"""benchmarks/scaling.py on CPU (gloo): the Stage-2 scaling launcher runs N = 1 and 2 processes at
the same global batch, and their loss trajectories agree."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import scaling  # noqa: E402
from tiny import tiny_llama  # noqa: E402


def test_scaling_runs_and_trajectories_agree(tmp_path, monkeypatch):
    from test_refine import _tokenizer

    teacher = tmp_path / "teacher"
    tiny_llama().save_pretrained(teacher)
    _tokenizer().save_pretrained(teacher)
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    assert scaling.main(["--nprocs", "1", "2", "--teacher", str(teacher), "--seq-len", "16", "--global-batch", "4",
                         "--steps", "4", "--warmup-steps", "1"]) == 0
    res = json.loads((tmp_path / "out" / "scaling.json").read_text())
    one, two = res["runs"]
    assert (one["nprocs"], two["nprocs"]) == (1, 2) and (one["micro_batch"], two["micro_batch"]) == (4, 2)
    assert len(one["losses"]) == len(two["losses"]) == 4 and one["losses"][0] > 0
    assert two["max_rel_loss_diff_vs_base"] < 1e-5
    assert one["efficiency"] == 1.0 and two["tokens_per_s"] > 0
