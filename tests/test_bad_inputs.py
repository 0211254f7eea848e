"""Every command-line tool refuses bad input up front: one message naming the key or the file, exit
status 2, and nothing written but Hydra's record of the run and its log.

Each case runs the tool's console entry point in this process (a subprocess would cost seconds of
imports per case). Placeholders: ``{files}`` is a folder of prepared files, ``{run}`` the case's own
run folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from faults import SAFETENSORS_LIES, corrupt_tensor_bytes, write_weight_files
from gptlab.config_tree import CONFIG_DIR
from gptlab.model.config import GPTConfig
from gptlab.cli import chat, classify, evaluate, export, generate, judge, respond, reward, serve, tokenizer, train

TOOLS = {"train": (train.main, "gptlab-train"), "generate": (generate.main, "gptlab-generate"),
         "chat": (chat.main, "gptlab-chat"), "classify": (classify.main, "gptlab-classify"),
         "eval": (evaluate.main, "gptlab-eval"), "export": (export.main, "gptlab-export"),
         "judge": (judge.main, "gptlab-judge"), "respond": (respond.main, "gptlab-respond"),
         "reward": (reward.main, "gptlab-reward"), "serve": (serve.main, "gptlab-serve"),
         "tokenizer": (tokenizer.main, "gptlab-tokenizer")}
MINI_LAYERS = GPTConfig.from_name("gpt2-mini").n_layers
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA where there is none")

CASES = [
    # --- gptlab-train: values out of type, range or choices (refused before the run folder exists)
    ("train", ["task.optimizer.lr=abc"], "task.optimizer.lr='abc': expected a number in (0, 10]"),
    ("train", ["task.optimizer.lr=1e38"], "task.optimizer.lr=1e+38: expected a number in (0, 10]"),  # overflowed in AdamW
    ("train", ["task.optimizer.lr=-1"], "task.optimizer.lr=-1"),
    ("train", ["task.optimizer.lr=0"], "task.optimizer.lr=0"),
    ("train", ["task.optimizer._target_=os.system"], "task.optimizer._target_='os.system': expected an optimizer of torch.optim"),
    ("train", ["task.weight_decay_on=some"], "task.weight_decay_on='some'"),
    ("train", ["task.lr_schedule.name=cosinee"], "task.lr_schedule.name='cosinee': expected one of ['constant', 'cosine'"),
    ("train", ["task.lr_schedule.warmup_steps=-1"], "task.lr_schedule.warmup_steps=-1"),
    ("train", ["task.lr_schedule.warmup_steps=2.5"], "task.lr_schedule.warmup_steps=2.5"),
    ("train", ["task.lr_schedule.min_lr=0.1"], "task.lr_schedule.min_lr=0.1: expected at most the peak task.optimizer.lr"),
    ("train", ["task.grad_clip=-1"], "task.grad_clip=-1"),
    ("train", ["task.optimizer.weight_decay=-0.1"], "task.optimizer.weight_decay=-0.1"),
    ("train", ["task.sample_top_k=-3"], "task.sample_top_k=-3"),
    ("train", ["seed=abc"], "seed='abc'"),
    ("train", ["model.n_layers=0"], "model.n_layers=0: expected an integer >= 1"),
    ("train", ["model.n_heads=5"], "n_heads=5"),
    ("train", ["model.drop_rate=1.5"], "model.drop_rate=1.5"),
    ("train", ["data.stride=0"], "data.stride=0"),
    ("train", ["data.batch_size=0"], "data.batch_size=0"),
    ("train", ["data.max_length=4096"], "data.max_length=4096: expected at most model.context_length=128"),
    ("train", ["data.train_ratio=0"], "data.train_ratio=0"),
    ("train", ["data.num_workers=-1"], "data.num_workers=-1"),
    ("train", ["data.path=/nonexistent/corpus.txt"], "data.path='/nonexistent/corpus.txt'"),
    ("train", ["adapter=lora", "adapter.rank=0"], "adapter.rank=0: expected an integer >= 1"),
    ("train", ["adapter=lora", "adapter.alpha=0"], "adapter.alpha=0"),
    ("train", ["adapter=lora", "adapter.targets=[qq]"], "adapter.targets=['qq']"),
    ("train", ["adapter=lora", "adapter.scaling=sqrt"], "adapter.scaling='sqrt'"),
    ("train", ["trainer.max_steps=0"], "trainer.max_steps=0"),
    ("train", ["task=grpo", "data=problems", "data.path={files}/noanswer.jsonl", "model=gpt2-tiny"],
     "noanswer.jsonl: entry 1 (line 2) has no 'answer'"),
    ("train", ["task=grpo", "data=problems", "task.num_generations=1"], "task.num_generations=1: expected an integer >= 2"),
    ("train", ["trainer.max_steps=-1", "trainer.max_epochs=-1"], "trainer.max_steps=-1 with trainer.max_epochs=-1"),
    ("train", ["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0"),
    ("train", ["trainer.precision=17"], "trainer.precision=17"),
    pytest.param("train", ["trainer.accelerator=gpu"], "trainer.accelerator='gpu'", marks=NO_CUDA),
    ("train", ["callbacks.nonfinite_guard.action=explode"], "callbacks.nonfinite_guard.action='explode'"),
    ("train", ["callbacks.step_checkpoint.every_n_train_steps=0"], "callbacks.step_checkpoint.every_n_train_steps=0"),
    ("train", ["init_from=gpt9"], "init_from='gpt9': expected a pretrained model name"),
    ("train", ["task=classify", "data=spam", "task.pooling=avg"], "task.pooling='avg'"),
    ("train", ["task=classify", "data=spam", "data.format=xls"], "data.format='xls'"),
    ("train", ["task=classify", "data=spam", "data.encoding=utf-9"], "data.encoding='utf-9'"),
    ("train", ["task=instruct", "data=instruct", "data.prompt_style=chatml"], "data.prompt_style='chatml'"),
    ("train", ["task=instruct", "data=instruct", "task.temperature=-1"], "task.temperature=-1"),
    ("train", ["task=instruct", "data=instruct", "task.top_p=0"], "task.top_p=0"),
    ("train", ["task=dpo", "data=preference", "task.beta=0"], "task.beta=0"),
    ("train", ["task=dpo", "data=preference", "task.loss_type=kto"], "task.loss_type='kto'"),
    ("train", ["task=reward_model", "data=preference", "data.batch_size=0"], "data.batch_size=0"),
    ("train", ["adapter=qlora", "adapter.block_size=0"], "adapter.block_size=0"),
    ("train", ["task.lr=1e-3"], "unknown key task.lr; task has: "),  # moved to task.optimizer.lr
    ("train", ["task=dpo", "data=preference", "task.betaa=0.2"], "unknown key task.betaa; task has: "),
    # --- every tool: a mistyped key names the closest one, a wrong group option lists the valid ones
    ("train", ["trainer.max_step=5"], "unknown key trainer.max_step; trainer has: "),
    ("train", ["trainer.max_step=5"], "did you mean trainer.max_steps?"),
    ("train", ["task.lr=1e-3"], "did you mean task.optimizer.lr?"),
    ("train", ["task=dpo", "data=preference", "task.betaa=0.2"], "did you mean task.beta?"),
    ("train", ["model.nlayers=2"], "did you mean model.n_layers?"),
    ("train", ["task.foo.bar=1"], "unknown key task.foo.bar; task has: "),
    ("train", ["model=gpt9"], "model=gpt9: no such option"),
    ("train", ["model=gpt2-smal"], "did you mean model=gpt2-small? model options (closest first): gpt2-small, "),
    ("train", ["task=ppo", "data=prompts", "task/reward=token_cnt"], "did you mean task/reward=token_count?"),
    ("train", ["experiment=ch5_verdict"], "did you mean experiment=ch05_verdict?"),
    ("train", ["a=["], "cannot read the argument 'a=['"),
    ("train", ["+trainer.max_steps=3"], "An item is already at 'trainer.max_steps'"),
    ("eval", ["init_from=gpt2-small", "data=verdit"], "did you mean data=verdict?"),
    ("chat", ["ckpt_path={files}/good.ckpt", "max_new_token=5"], "did you mean max_new_tokens?"),
    ("classify", ["ckpt_path={files}/good.ckpt", "text=hi", "batchsize=2"], "did you mean batch_size?"),
    ("export", ["init_from=gpt2-small", "out_dir={run}/x", "dtyp=fp16"], "did you mean dtype?"),
    ("judge", ["responses={files}/responses.json", "judge.modle=llama3"], "did you mean judge.model?"),
    ("respond", ["init_from=gpt2-small", "output={run}/r.json", "max_new_token=4"], "did you mean max_new_tokens?"),
    ("respond", ["init_from=gpt2-small", "output={run}/r.json", "data=preferenc"], "did you mean data=preference?"),
    ("reward", ["ckpt_path={files}/good.ckpt", "responses={files}/responses.json", "batchsize=2"],
     "did you mean batch_size?"),
    # --- gptlab-train: files
    ("train", ["ckpt_path={files}/missing.ckpt"], "{files}/missing.ckpt"),
    ("train", ["ckpt_path={files}/corrupt.ckpt"], "{files}/corrupt.ckpt is corrupted"),
    ("train", ["ckpt_path={files}/truncated.ckpt"], "{files}/truncated.ckpt is not a complete checkpoint"),
    ("train", ["ckpt_path={files}/weights.ckpt"], "holds weights only"),
    ("train", ["init_from={files}/corrupt.ckpt"], "{files}/corrupt.ckpt is corrupted"),
    ("train", ["experiment=ch08_ppo_scratch", "sft_checkpoint={files}/good.ckpt"],
     "task.reward.ckpt_path=None, task.reward.init_from=None: expected the reward model: a task=reward_model "
     "checkpoint (reward_checkpoint=<path>"),
    ("train", ["experiment=ch08_ppo", "sft_checkpoint={files}/good.ckpt", "reward_checkpoint={files}/missing.ckpt"],
     "task.reward.ckpt_path='{files}/missing.ckpt': expected a checkpoint file that exists"),
    # --- a resume the checkpoint cannot continue into, and a starting file that is not safe or not gptlab's
    ("train", ["ckpt_path={files}/resumable.ckpt", f"model.n_layers={MINI_LAYERS + 1}"],
     f"model.n_layers={MINI_LAYERS + 1}: expected {MINI_LAYERS}, the checkpoint's"),
    ("train", ["ckpt_path={files}/resumable.ckpt", "data=text", "data.path={files}/texts.txt", "data.num_workers=2"],
     "data.num_workers=2: expected 0, the checkpoint's"),
    ("train", ["init_from={files}/code.ckpt"], "init_from='{files}/code.ckpt': "),
    ("train", ["init_from={files}/code.pt"], "init_from='{files}/code.pt': "),
    ("train", ["init_from={files}/foreign.ckpt"], "no 'gptlab_task' entry"),
    ("train", ["hydra.run.dir={files}/old_run"], "{files}/old_run/checkpoints already holds checkpoints (last.ckpt)"),
    ("train", ["hydra.run.dir={files}/best_only"],
     "{files}/best_only/checkpoints already holds checkpoints (best-epoch000-step000010.ckpt); a fresh run there would "
     "overwrite them. None of them holds the training state a resume needs (weights only); start from their weights "
     "with init_from={files}/best_only/checkpoints/best-epoch000-step000010.ckpt"),
    ("train", ["task=instruct", "data=instruct", "data.path={files}/huge_line.jsonl", "data.max_record_bytes=1000"],
     "{files}/huge_line.jsonl: line 2 is 5,047 bytes long, more than data.max_record_bytes=1,000"),
    ("train", ["task=instruct", "data=instruct", "data.path={files}/broken.json"], "{files}/broken.json: invalid JSON at line 2"),
    ("train", ["task=classify", "data=spam", "data.path={files}/broken.tsv"], "{files}/broken.tsv:2: expected 'label<TAB>text'"),
    ("train", ["task=instruct", "data=instruct", "data.path={files}/long_prompts.json", "data.allowed_max_length=32"],
     "{files}/long_prompts.json: none of the 8 training entries can be learned from"),  # every label masked
    ("train", ["task=reward_model", "data=preference", "data.path={files}/same_pairs.json"],
     "{files}/same_pairs.json: none of the 8 training pairs can be learned from"),  # chosen == rejected
    # --- gptlab-generate
    ("generate", ["init_from=gpt2-small", "temperature=-1"], "temperature=-1: expected a number >= 0"),
    ("generate", ["init_from=gpt2-small", "top_p=0"], "top_p=0: expected a number in (0, 1]"),
    ("generate", ["init_from=gpt2-small", "top_p=1.5"], "top_p=1.5"),
    ("generate", ["init_from=gpt2-small", "top_k=-1"], "top_k=-1"),
    ("generate", ["init_from=gpt2-small", "max_new_tokens=-5"], "max_new_tokens=-5: expected an integer >= 0"),
    ("generate", ["init_from=gpt2-small", "prompt="], "prompt='': expected a non-empty string"),
    ("generate", [], "ckpt_path=None, init_from=None: expected exactly one of them"),
    ("generate", ["ckpt_path={files}/corrupt.ckpt"], "{files}/corrupt.ckpt is corrupted"),
    ("generate", ["ckpt_path={files}/empty.ckpt"], "{files}/empty.ckpt is empty"),
    ("generate", ["ckpt_path={files}/good.ckpt", "adapter_path={files}/missing.safetensors"], "adapter_path="),
    pytest.param("generate", ["init_from=gpt2-small", "device=cuda"], "device='cuda'", marks=NO_CUDA),
    ("generate", ["init_from=gpt2-small", "precision=fp8"], "precision='fp8'"),
    ("generate", ["init_from=gpt2-small", "tempreature=0.5"], "unknown key tempreature; the config has: "),
    ("generate", ["init_from=gpt2-small", "tempreature=0.5"], "did you mean temperature?"),
    # --- gptlab-chat
    ("chat", ["ckpt_path={files}/good.ckpt", "temperature=-0.5"], "temperature=-0.5"),
    ("chat", ["ckpt_path={files}/good.ckpt", "prompt_style=chatml"], "prompt_style='chatml'"),
    ("chat", ["ckpt_path={files}/good.ckpt", "instruction="], "instruction=''"),
    ("chat", ["ckpt_path={files}/truncated.ckpt"], "{files}/truncated.ckpt"),
    # --- gptlab-classify
    ("classify", ["ckpt_path={files}/good.ckpt", "text=hi", "input={files}/texts.txt"], "expected exactly one of them"),
    ("classify", ["ckpt_path={files}/good.ckpt", "input={files}/missing.txt"], "input='{files}/missing.txt'"),
    ("classify", ["ckpt_path={files}/good.ckpt", "text=hi", "batch_size=0"], "batch_size=0"),
    ("classify", ["ckpt_path={files}/good.ckpt", "text=hi", "pooling=avg"], "pooling='avg'"),
    ("classify", ["ckpt_path={files}/corrupt.ckpt", "text=hi"], "{files}/corrupt.ckpt is corrupted"),
    # --- gptlab-eval
    ("eval", ["init_from=gpt2-small", "splits=[test]"], "splits=['test']"),
    ("eval", ["init_from=gpt2-small", "max_batches=0"], "max_batches=0"),
    ("eval", ["init_from=gpt2-small", "data.stride=0"], "data.stride=0"),
    ("eval", ["init_from=gpt9"], "init_from='gpt9'"),
    # --- gptlab-export
    ("export", ["init_from=gpt2-small", "out_dir={run}/x", "dtype=int8"], "dtype='int8'"),
    ("export", ["init_from=gpt2-small", "out_dir={run}/x", "n_heads=0"], "n_heads=0"),
    ("export", ["init_from=gpt2-small", "ckpt_path={files}/good.ckpt", "out_dir={run}/x"], "expected exactly one of them"),
    ("export", ["ckpt_path={files}/corrupt.ckpt", "out_dir={run}/x"], "{files}/corrupt.ckpt is corrupted"),
    # --- files that lie: crafted safetensors headers, NaN/inf weights with valid checksums, adapter metadata
    ("train", ["ckpt_path={files}/nan.ckpt"], "{files}/nan.ckpt: tensor 'model.blocks.0.attn.qkv.weight' holds 1 NaN"),
    ("generate", ["ckpt_path={files}/nan.ckpt"], "{files}/nan.ckpt: tensor 'model.blocks.0.attn.qkv.weight' holds 1 NaN"),
    ("generate", ["init_from={files}/nan.safetensors"],
     "{files}/nan.safetensors: tensor 'transformer.h.0.mlp.c_fc.weight' holds 1 NaN"),
    ("chat", ["init_from={files}/inf_book.pth", "instruction=hi"],
     "{files}/inf_book.pth: tensor 'trf_blocks.0.ff.layers.0.weight' holds 1 infinite"),
    ("classify", ["ckpt_path={files}/nan.ckpt", "text=hi"], "{files}/nan.ckpt: tensor 'model.blocks.0.attn.qkv.weight'"),
    ("eval", ["init_from={files}/nan.ckpt"], "{files}/nan.ckpt: tensor 'model.blocks.0.attn.qkv.weight' holds 1 NaN"),
    ("export", ["init_from={files}/inf_book.pth", "out_dir={run}/x"], "{files}/inf_book.pth: tensor 'trf_blocks.0"),
    *(("generate", [f"init_from={{files}}/lie_{lie}.safetensors"], f"{{files}}/lie_{lie}.safetensors")
      for lie in SAFETENSORS_LIES),
    *(("generate", ["init_from={files}/tiny.safetensors", f"adapter_path={{files}}/{name}.safetensors"],
       f"{{files}}/{name}.safetensors{expected}")
      for name, expected in (("nan_adapter", ": tensor 'blocks.0.mlp.fc.lora_B' holds 1 NaN"),
                             ("adapter_not_json", ": its 'config' metadata is not JSON"),
                             ("adapter_list", ": its 'config' metadata is a JSON list"),
                             ("adapter_rank_1e9", ": tensor 'blocks.0.attn.proj.lora_A' has shape [32, 2], but the "
                                                  "adapter's rank is 1000000000"),
                             ("adapter_garbage", " is not a valid safetensors file"))),
    # --- gptlab-judge
    ("judge", ["responses={files}/missing.json"], "responses='{files}/missing.json'"),
    ("judge", ["responses={files}/responses.json", "judge.backend=claude"], "judge.backend='claude'"),
    ("judge", ["responses={files}/responses.json", "judge.timeout=0"], "judge.timeout=0"),
    ("judge", ["responses={files}/responses.json", "judge.url=ftp://example.org"], "judge.url='ftp://example.org'"),
    ("judge", ["responses={files}/responses.json", "judge.retries=-1"], "judge.retries=-1"),
    ("judge", ["responses={files}/responses.json", "judge.max_answer_bytes=0"], "judge.max_answer_bytes=0: expected an integer >= 1"),
    ("judge", ["responses={files}/broken.json"], "{files}/broken.json: invalid JSON at line 2"),
    # --- gptlab-serve
    ("serve", [], "ckpt_path=None, init_from=None: expected exactly one of them"),
    ("serve", ["init_from=gpt2-small", "port=70000"], "port=70000: expected an integer in [0, 65535]"),
    ("serve", ["init_from=gpt2-small", "max_batch_size=0"], "max_batch_size=0"),
    ("serve", ["init_from=gpt2-small", "max_queue=0"], "max_queue=0"),
    ("serve", ["init_from=gpt2-small", "prompt_style=chatml"], "prompt_style='chatml'"),
    ("serve", ["ckpt_path={files}/corrupt.ckpt"], "{files}/corrupt.ckpt is corrupted"),
    # --- gptlab-respond
    ("respond", ["init_from=gpt2-small", "output={run}/r.json", "split=dev"], "split='dev'"),
    ("respond", ["init_from=gpt2-small", "output={run}/r.json", "temperature=-1"], "temperature=-1: expected a number >= 0"),
    ("respond", ["init_from=gpt2-small", "output={run}/r.json", "data.batch_size=0"], "data.batch_size=0"),
    ("respond", ["init_from=gpt2-small", "output={run}/r.json", "data.prompt_style=chatml"], "data.prompt_style='chatml'"),
    ("respond", ["ckpt_path={files}/corrupt.ckpt", "output={run}/r.json"], "{files}/corrupt.ckpt is corrupted"),
    # --- gptlab-reward
    ("reward", ["ckpt_path={files}/good.ckpt", "responses={files}/responses.json", "max_length=0"], "max_length=0"),
    ("reward", ["ckpt_path={files}/good.ckpt", "responses={files}/responses.json", "batch_size=0"], "batch_size=0"),
    ("reward", ["ckpt_path={files}/good.ckpt", "responses={files}/responses.json", "prompt_style=chatml"],
     "prompt_style='chatml'"),
    ("reward", ["responses={files}/responses.json"], "ckpt_path=None, init_from=None: expected exactly one of them"),
    # --- gptlab-tokenizer (the first argument is the command)
    ("tokenizer", [], "no command"),
    ("tokenizer", ["encdoe", "text=hello"], "unknown command 'encdoe' (did you mean encode?)"),
    ("tokenizer", ["train", "data.path={files}/texts.txt", "vocab_size=100", "out={run}/tok"],
     "vocab_size=100: expected an integer in [257, 65536]"),
    ("tokenizer", ["train", "data.path={files}/missing.txt", "out={run}/tok"], "no such file or folder"),
    ("tokenizer", ["encode", "tokenizer={files}/missing", "text=hello"], "expected gpt2 or a folder written by"),
    ("tokenizer", ["encode", "text=a <|im_start|> b"], "'<|im_start|>' (character 2), which is not a special token"),
    ("tokenizer", ["decode", "ids=[1,50257]"], "ids: 50257 is not an id of gpt2"),
    ("train", ["tokenizer={files}/missing"], "tokenizer='{files}/missing': expected gpt2 or a folder written by"),
]


class _RunsCode:
    """Pickled as a call of ``os.getcwd``: loading the file with plain pickle would call it."""

    def __reduce__(self):
        import os
        return (os.getcwd, ())


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Checkpoints good and damaged, weights files that lie, a run folder with checkpoints, and
    malformed data files."""
    d = tmp_path_factory.mktemp("inputs")
    good = d / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(64, 64)}, "gptlab_task": "gptlab.tasks.pretrain.PretrainTask",
                "hyper_parameters": {}}, good)
    shutil.copy(good, d / "corrupt.ckpt")
    corrupt_tensor_bytes(d / "corrupt.ckpt", 64)
    (d / "truncated.ckpt").write_bytes(good.read_bytes()[:2000])
    (d / "empty.ckpt").write_bytes(b"")
    shutil.copy(good, d / "weights.ckpt")  # no optimizer state: not resumable
    (d / "old_run" / "checkpoints").mkdir(parents=True)
    shutil.copy(good, d / "old_run" / "checkpoints" / "last.ckpt")
    torch.save({"state_dict": {}, "gptlab_task": "pretrain", "optimizer_states": [], "loops": {},
                "hyper_parameters": {"model": GPTConfig.from_name("gpt2-mini").to_dict()},
                "datamodule_hyper_parameters": {"num_workers": 0}}, d / "resumable.ckpt")
    torch.save({"state_dict": {}, "epoch": 0}, d / "foreign.ckpt")  # another program's Lightning checkpoint
    torch.save({"state_dict": {}, "gptlab_task": "pretrain", "x": _RunsCode()}, d / "code.ckpt")
    torch.save({"w": _RunsCode()}, d / "code.pt")
    (d / "broken.json").write_text('[\n  {"instruction": "x", "input": "", "output": "y",}\n]\n')
    (d / "broken.tsv").write_text("ham\thello\nthis line has no tab\n")
    (d / "best_only" / "checkpoints").mkdir(parents=True)
    shutil.copy(good, d / "best_only" / "checkpoints" / "best-epoch000-step000010.ckpt")
    (d / "huge_line.jsonl").write_text("".join(json.dumps({"instruction": i, "input": "", "output": "y"}) + "\n"
                                               for i in ("x", "w" * 5000, "z")))
    (d / "long_prompts.json").write_text(json.dumps([{"instruction": "word " * 40, "input": "", "output": "y"}] * 10))
    (d / "same_pairs.json").write_text(json.dumps([{"prompt": "Hi?", "chosen": "Hello.", "rejected": "Hello."}] * 10))
    (d / "texts.txt").write_text("one\ntwo\n")
    (d / "noanswer.jsonl").write_text('{"prompt": "1 + 1?", "answer": 2}\n{"prompt": "2 + 2?"}\n')
    (d / "responses.json").write_text('[{"instruction": "x", "input": "", "output": "y", "model_response": "y"}]')
    write_weight_files(d)  # tiny.safetensors, lie_*.safetensors, nan.ckpt, inf_book.pth, *adapter*.safetensors
    return d


def written_files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("tool,args,expected", CASES, ids=[
    f"{c.values[0] if hasattr(c, 'values') else c[0]}:{' '.join(c.values[1] if hasattr(c, 'values') else c[1])}"
    for c in CASES])
def test_bad_input_is_refused_naming_it_and_nothing_is_written(tool, args, expected, files, tmp_path,
                                                               monkeypatch, run_entry):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    args = [a.format(files=files, run=run) for a in args]
    if tool == "train" and not any(a.startswith("hydra.run.dir=") for a in args):
        args.append(f"hydra.run.dir={run}")
    main, prog = TOOLS[tool]
    code, out, err = run_entry(main, prog, *args)
    assert code == 2, f"exit status {code}\n{out[-2000:]}\n{err[-3000:]}"
    assert f"{prog}: error:" in err and expected.format(files=files) in err, err
    assert "Traceback" not in err
    # Hydra's record of the run and its log, when the run got that far; nothing else
    assert {f for f in written_files(tmp_path) if not f.startswith("run/.hydra/")} <= {"run/train.log"}
    assert written_files(files / "old_run") == {"checkpoints/last.ckpt"}
    assert written_files(files / "best_only") == {"checkpoints/best-epoch000-step000010.ckpt"}


def test_the_table_covers_every_tool_with_at_least_40_cases():
    tools = [c.values[0] if hasattr(c, "values") else c[0] for c in CASES]
    assert len(CASES) >= 40 and set(tools) == set(TOOLS)


BOOK_PIPELINE_PRESETS = ["ch07_dpo", "ch07_dpo_scratch", "ch08_reward_model", "ch08_reward_model_scratch", "ch08_ppo",
                         "ch08_ppo_scratch"]


@pytest.mark.parametrize("preset", BOOK_PIPELINE_PRESETS)
def test_a_preset_without_its_sft_checkpoint_is_one_line_and_creates_nothing(preset, tmp_path, monkeypatch, run_entry):
    """The first command of each preference/RLHF page, without sft_checkpoint=: one line naming the
    key and what it is for, exit status 2, no run folder (init_from: ${sft_checkpoint} once made
    OmegaConf's missing-key scan raise, after Hydra had created the run folder)."""
    monkeypatch.chdir(tmp_path)
    code, out, err = run_entry(train.main, "gptlab-train", f"experiment={preset}")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("gptlab-train: missing value for sft_checkpoint=... (the ch07") and "Traceback" not in err
    assert written_files(tmp_path) == set() and not (tmp_path / "outputs").exists()


def test_a_ppo_preset_without_its_reward_checkpoint_creates_nothing(files, tmp_path, monkeypatch, run_entry):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_entry(train.main, "gptlab-train", "experiment=ch08_ppo_scratch",
                               f"sft_checkpoint={files}/good.ckpt")
    assert code == 2 and "reward_checkpoint=<path>" in err and "Traceback" not in err
    assert written_files(tmp_path) == set()


@pytest.mark.parametrize("args", [["ckpt_path={files}/resumable.ckpt", "model.n_layers=9"],
                                  ["ckpt_path={files}/resumable.ckpt", "data.num_workers=2"],
                                  ["init_from={files}/code.ckpt"]], ids=["shape", "workers", "code"])
def test_a_resume_that_cannot_work_or_a_file_that_names_code_is_refused_before_the_run_folder(args, files, tmp_path,
                                                                                               monkeypatch, run_entry):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    code, out, err = run_entry(train.main, "gptlab-train", *[a.format(files=files) for a in args],
                               f"hydra.run.dir={run}")
    assert code == 2 and "Traceback" not in err and not run.exists(), err


REFUSED_COMMAND_LINES = [("train", ["trainer.max_step=5"]), ("train", ["model=gpt9"]), ("train", ["a=["]),
                         ("train", ["task.lrr=1", "trainer.max_step=5"]), ("generate", ["tempreature=0.5"]),
                         ("eval", ["data=verdit"]), ("respond", ["data=preferenc"])]


@pytest.mark.parametrize("tool,args", REFUSED_COMMAND_LINES, ids=[f"{t}:{' '.join(a)}" for t, a in REFUSED_COMMAND_LINES])
def test_a_command_line_hydra_refuses_is_one_line_per_mistake_and_status_2(tool, args, tmp_path, monkeypatch,
                                                                             run_entry):
    """Hydra's own report of the refusal (its "Could not override" block, the search path, the
    HYDRA_FULL_ERROR hint) is replaced by gptlab's line: one per mistake, exit status 2 (not 1)."""
    monkeypatch.chdir(tmp_path)
    main, prog = TOOLS[tool]
    code, out, err = run_entry(main, prog, *args, f"hydra.run.dir={tmp_path / 'run'}")
    lines = err.strip().splitlines()
    mistakes = sum(1 for a in args if a.split("=", 1)[0] in ("task.lrr", "trainer.max_step")) or 1
    assert code == 2 and len(lines) == mistakes and all(line.startswith(f"{prog}: error: ") for line in lines), err
    for noise in ("Could not override", "HYDRA_FULL_ERROR", "Config search path", "Available options"):
        assert noise not in err
    assert not (tmp_path / "run").exists()


def test_a_wrong_group_option_lists_every_valid_one_closest_first(tmp_path, monkeypatch, run_entry):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_entry(train.main, "gptlab-train", "model=gpt2-medum", f"hydra.run.dir={tmp_path / 'run'}")
    listed = err.strip().split("model options (closest first): ", 1)[1].split(", ")
    assert code == 2 and listed[0] == "gpt2-medium"
    assert sorted(listed) == sorted(p.stem for p in (Path(CONFIG_DIR) / "model").glob("*.yaml"))


def test_every_bad_value_is_listed_at_once(tmp_path, monkeypatch, run_entry):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_entry(train.main, "gptlab-train", "task.optimizer.lr=abc", "task.lr_schedule.name=cosinee",
                             "adapter=lora", "adapter.rank=0", "model.n_layers=0", "data.stride=0",
                             f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2 and "5 invalid config values" in err
    for key in ("task.optimizer.lr=", "task.lr_schedule.name=", "adapter.rank=", "model.n_layers=", "data.stride="):
        assert key in err
    assert not (tmp_path / "run").exists()


def test_every_bad_model_field_is_listed_at_once(tmp_path, monkeypatch, run_entry):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_entry(train.main, "gptlab-train", "model=gpt2-tiny", "model.n_heads=3", "model.drop_rate=2",
                             f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2 and "2 invalid config values" in err
    assert "model.n_heads=3: expected a divisor of emb_dim=32" in err and "model.drop_rate=2: expected a number" in err
    assert not (tmp_path / "run").exists()


def test_a_sweep_runs_every_job_and_exits_non_zero_naming_the_failed_ones(tmp_path, monkeypatch, run_entry):
    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "sweep"
    code, out, err = run_entry(train.main, "gptlab-train", "-m", "task.optimizer.lr=abc,-1", f"hydra.sweep.dir={sweep}")
    assert code == 1
    assert "2 job(s) did not finish: 0, 1" in out  # after both ran
    assert "task.optimizer.lr='abc'" in (sweep / "0" / "FAILED").read_text()
    assert "task.optimizer.lr=-1" in (sweep / "1" / "FAILED").read_text()
