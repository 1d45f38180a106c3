"""pyens.progress: the progress display of training and evaluation (a plain line every few
seconds where stderr is not a terminal)."""
import io

from pyens.progress import LineProgress, progress


def test_progress_is_a_line_every_few_seconds_when_not_a_terminal():
    log = io.StringIO()
    assert isinstance(progress(10, "x", file=log), LineProgress)
    now = [0.0]
    bar = LineProgress(1000, "mat mnist", file=log, interval=10.0, clock=lambda: now[0])
    for _ in range(1000):  # 1000 batches over 50 s: a line per 10 s, not a frame per batch
        now[0] += 0.05
        bar.update(1)
        bar.set_postfix(loss="0.123", refresh=False)
    bar.close()
    lines = log.getvalue().splitlines()
    assert 5 <= len(lines) <= 6 and "\r" not in log.getvalue()
    assert lines[0].startswith("mat mnist: 200/1000 batch (20%), 0:10 elapsed, 20 batch/s, eta 0:40, loss=0.123")
    assert lines[-1].startswith("mat mnist: 1000/1000 batch (100%), 0:50 elapsed")
