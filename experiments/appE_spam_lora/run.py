"""Appendix E's LoRA scale: ``plain`` (the printed book: the update A @ B times alpha) vs ``rank``
(the book's code since Sep 2025: times alpha / rank) on ``experiment=appE_spam_lora_cpu``, rank 16,
alpha 16 (scale 16 vs 1), everything else equal, on the book's split.

    python experiments/appE_spam_lora/run.py                     # seeds 123 124 125
    python experiments/appE_spam_lora/run.py --seeds 123

Runs ``experiments/ch06_spam/run.py`` with ``--vary adapter.scaling plain rank`` (see there).
"""

import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    defaults = ["--preset", "appE_spam_lora_cpu", "--vary", "adapter.scaling", "plain", "rank",
                "--fixed", "task.pooling=last_position", "data.pad_to_max_length=true",
                "--out", str(here.parents[1] / "outputs" / "appE_lora_scaling")]
    sys.argv[1:1] = defaults  # options given on the command line come later and win
    runpy.run_path(str(here.parent / "ch06_spam" / "run.py"), run_name="__main__")
