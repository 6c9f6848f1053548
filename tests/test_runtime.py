"""What every job sets up before its work: deterministic torch, without a slow start."""

import subprocess
import sys
import textwrap


def test_a_job_runs_torch_deterministically_without_loading_the_compiler(tmp_path):
    # In a fresh interpreter: torch._inductor costs seconds to import, in every one of a run's
    # jobs, and nothing but torch.compile needs it.
    code = textwrap.dedent(
        f"""
        import sys, torch
        from robustft.runtime import job
        with job(log_path={str(tmp_path / "job.log")!r}, threads=1):
            assert torch.are_deterministic_algorithms_enabled()
            assert torch.is_deterministic_algorithms_warn_only_enabled()
            assert torch.get_num_threads() == 1
            assert "torch._inductor" not in sys.modules, "inductor was imported"
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr + (tmp_path / "job.log").read_text()


def test_deterministic_flag_reaches_inductor_when_it_is_loaded():
    code = textwrap.dedent(
        """
        import torch._inductor.config as inductor_config
        from robustft.runtime import use_deterministic_algorithms
        inductor_config.deterministic = False
        use_deterministic_algorithms()
        assert inductor_config.deterministic is True
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
