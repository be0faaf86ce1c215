"""`modeling_layalign.training.distributed_exit`: a process leaves without the interpreter's finalization, its exit hooks run,
its output flushed, its status kept."""

import subprocess
import sys
import textwrap


def test_exit_hooks_run_and_output_is_flushed_before_the_process_ends(tmp_path):
    script = textwrap.dedent(
        f"""
        import atexit, pathlib, sys
        from modeling_layalign.training.distributed_exit import exit_without_finalization
        atexit.register(pathlib.Path({str(tmp_path / "hook")!r}).touch)
        print("written", end="")  # no newline: still buffered when the process ends
        sys.stderr.write("also written")
        exit_without_finalization(3)
        print("never printed")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 3
    assert result.stdout == "written" and result.stderr.endswith("also written")
    assert (tmp_path / "hook").is_file()
