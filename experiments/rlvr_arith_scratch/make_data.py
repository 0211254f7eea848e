"""Write the problem files of experiment=rlvr_arith_scratch: sft.json (worked examples for the SFT base,
experiment=rlvr_arith_sft_scratch) and train.jsonl / test.jsonl, generated with the GRPO preset's own
data settings (conf/experiment/rlvr_arith_scratch.yaml), so the held-out problems GRPO and gptlab-solve
grade are never among the SFT examples; and corpus.txt, the SFT examples as the model reads them (in the
presets' prompt style, one per line): the text the pipeline's tokenizer is trained on
(gptlab-tokenizer train data.path=corpus.txt).

    python experiments/rlvr_arith_scratch/make_data.py --out data/arith [--num-sft 3000] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from omegaconf import OmegaConf

from gptlab.data.problems import generate_problems, write_problem_files
from gptlab.data.prompt_styles import get_prompt_style

PRESET = Path(__file__).resolve().parents[2] / "conf" / "experiment" / "rlvr_arith_scratch.yaml"
SETTINGS = ("min_digits", "max_digits", "operators", "word_problems", "spaced_digits")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write sft.json, train.jsonl, test.jsonl into")
    parser.add_argument("--num-sft", type=int, default=None, help="SFT examples (default: every training problem)")
    parser.add_argument("--seed", type=int, default=None, help="the generator's seed (default: the preset's data.seed)")
    parser.add_argument("--extra-test", type=int, default=0,
                        help="also write test_extra.jsonl: this many more held-out problems, none of them in the "
                             "training, validation or test set (a larger test for gptlab-solve data.path=...)")
    args = parser.parse_args()
    data = OmegaConf.to_container(OmegaConf.load(PRESET)["data"])
    settings = {k: data[k] for k in SETTINGS if k in data}
    seed = data["seed"] if args.seed is None else args.seed
    paths = write_problem_files(args.out, data["num_train"], data["num_test"], seed=seed, num_sft=args.num_sft,
                                num_val=data.get("num_val", 0), **settings)
    style = get_prompt_style(data.get("prompt_style", "alpaca"))
    examples = json.loads(paths["sft"].read_text(encoding="utf-8"))
    paths["corpus"] = Path(args.out) / "corpus.txt"
    paths["corpus"].write_text("".join(style.full_text(e) + "\n" for e in examples), encoding="utf-8")
    if args.extra_test:
        seen = {json.loads(line)["prompt"] for name in ("train", "val", "test") if name in paths
                for line in paths[name].read_text(encoding="utf-8").splitlines()}
        extra = generate_problems(args.extra_test, seed=seed + 3_000_003, exclude=seen, **settings)
        paths["test_extra"] = Path(args.out) / "test_extra.jsonl"
        paths["test_extra"].write_text("".join(json.dumps(p) + "\n" for p in extra), encoding="utf-8")
    print(" ".join(f"{name}={path}" for name, path in paths.items()))


if __name__ == "__main__":
    main()
