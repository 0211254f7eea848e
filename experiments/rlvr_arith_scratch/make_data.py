"""Write the problem files of experiment=rlvr_arith_scratch: sft.json (worked examples for the SFT base,
experiment=rlvr_arith_sft_scratch) and train.jsonl / test.jsonl, generated with the GRPO preset's own
data settings (conf/experiment/rlvr_arith_scratch.yaml), so the held-out problems GRPO and gptlab-solve
grade are never among the SFT examples.

    python experiments/rlvr_arith_scratch/make_data.py --out data/arith [--num-sft 3000] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from omegaconf import OmegaConf

from gptlab.data.problems import write_problem_files

PRESET = Path(__file__).resolve().parents[2] / "conf" / "experiment" / "rlvr_arith_scratch.yaml"
SETTINGS = ("min_digits", "max_digits", "operators", "word_problems", "spaced_digits")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write sft.json, train.jsonl, test.jsonl into")
    parser.add_argument("--num-sft", type=int, default=None, help="SFT examples (default: every training problem)")
    parser.add_argument("--seed", type=int, default=None, help="the generator's seed (default: the preset's data.seed)")
    args = parser.parse_args()
    data = OmegaConf.to_container(OmegaConf.load(PRESET)["data"])
    settings = {k: data[k] for k in SETTINGS if k in data}
    seed = data["seed"] if args.seed is None else args.seed
    paths = write_problem_files(args.out, data["num_train"], data["num_test"], seed=seed, num_sft=args.num_sft,
                                **settings)
    print(" ".join(f"{name}={path}" for name, path in paths.items()))


if __name__ == "__main__":
    main()
