"""benchmarks/scaling.py on CPU (gloo): the Stage-2 scaling launcher runs N = 1 and 2 processes at
the same global batch, and their loss trajectories agree."""
import json
import sys
from pathlib import Path

import pytest

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


def test_stage2_profile_on_cpu_with_a_random_weight_teacher_from_its_config(tmp_path, monkeypatch, capsys):
    """benchmarks/stage2_profile.py with --teacher CONFIG.json: a teacher of those shapes with random
    weights (what the GPU runs use, nothing to carry); the groups add up to the reported busy time
    and the conv and ATMN operators land in their own groups."""
    import stage2_profile

    cfg = tmp_path / "config.json"
    tiny_llama().config.to_json_file(cfg)
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    assert stage2_profile.main(["--teacher", str(cfg), "--seq-len", "16", "--global-batch", "2",
                                "--warmup-steps", "1", "--steps", "1"]) == 0
    res = json.loads((tmp_path / "out" / "stage2_profile.json").read_text())
    assert res["tokens_per_s"] > 0 and res["step_ms"] > 0 and not res["on_gpu"]
    assert abs(sum(res["groups_ms_per_step"].values()) - res["busy_ms_per_step"]) < 0.05
    assert "Stage-2 step, 2 x 16 tokens" in capsys.readouterr().out
    assert stage2_profile.group_of("_conv_bwd_kernel") == "causal conv1d"
    assert stage2_profile.group_of("_once_bwd_kernel") == "ATMN neurons"
    assert stage2_profile.group_of("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast"
                                   "<at::native::silu_backward_kernel") == "elementwise"
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(SystemExit, match="no model_type"):
        stage2_profile.main(["--teacher", str(bad)])


def test_stage2_profile_counts_kernels_once():
    """GPU-side user annotations (the optimizer step's span) and CPU operators are not added to the
    kernels' time."""
    from types import SimpleNamespace as NS

    import stage2_profile
    import torch

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    rows = [NS(key="multi_tensor_apply_kernel", device_type=cuda, self_device_time_total=300, count=3),
            NS(key="Optimizer.step#AdamW.step", device_type=cuda, self_device_time_total=1500, count=1),
            NS(key="aten::mm", device_type=cpu, self_device_time_total=900, count=2),
            NS(key="nvjet_sm90_tst", device_type=cuda, self_device_time_total=900, count=2)]
    prof = NS(key_averages=lambda: rows,
              events=lambda: [NS(name="Optimizer.step#AdamW.step", is_user_annotation=True),
                              NS(name="aten::mm", is_user_annotation=False)])
    assert stage2_profile._events(prof, on_gpu=True) == [("multi_tensor_apply_kernel", 300, 3),
                                                          ("nvjet_sm90_tst", 900, 2)]
