"""Every command-line tool refuses bad input up front: one message naming the key or the file, exit
status 2, and nothing written but Hydra's record of the run and its log.

Each case runs the tool's console entry point in this process (a subprocess would cost seconds of
imports per case). Placeholders: ``{files}`` is a folder of prepared files, ``{run}`` the case's own
run folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from faults import corrupt_tensor_bytes
from gptlab.config_tree import CONFIG_DIR
from gptlab.cli import chat, classify, evaluate, export, generate, judge, respond, reward, serve, train

TOOLS = {"train": (train.main, "gptlab-train"), "generate": (generate.main, "gptlab-generate"),
         "chat": (chat.main, "gptlab-chat"), "classify": (classify.main, "gptlab-classify"),
         "eval": (evaluate.main, "gptlab-eval"), "export": (export.main, "gptlab-export"),
         "judge": (judge.main, "gptlab-judge"), "respond": (respond.main, "gptlab-respond"),
         "reward": (reward.main, "gptlab-reward"), "serve": (serve.main, "gptlab-serve")}
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA where there is none")

CASES = [
    # --- gptlab-train: values out of type, range or choices (refused before the run folder exists)
    ("train", ["task.optimizer.lr=abc"], "task.optimizer.lr='abc': expected a number > 0"),
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
    ("train", ["hydra.run.dir={files}/old_run"], "{files}/old_run/checkpoints already holds checkpoints (last.ckpt)"),
    ("train", ["task=instruct", "data=instruct", "data.path={files}/broken.json"], "{files}/broken.json: invalid JSON at line 2"),
    ("train", ["task=classify", "data=spam", "data.path={files}/broken.tsv"], "{files}/broken.tsv:2: expected 'label<TAB>text'"),
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
    # --- gptlab-judge
    ("judge", ["responses={files}/missing.json"], "responses='{files}/missing.json'"),
    ("judge", ["responses={files}/responses.json", "judge.backend=claude"], "judge.backend='claude'"),
    ("judge", ["responses={files}/responses.json", "judge.timeout=0"], "judge.timeout=0"),
    ("judge", ["responses={files}/responses.json", "judge.url=ftp://example.org"], "judge.url='ftp://example.org'"),
    ("judge", ["responses={files}/responses.json", "judge.retries=-1"], "judge.retries=-1"),
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
]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Checkpoints good and damaged, a run folder with checkpoints, and malformed data files."""
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
    (d / "broken.json").write_text('[\n  {"instruction": "x", "input": "", "output": "y",}\n]\n')
    (d / "broken.tsv").write_text("ham\thello\nthis line has no tab\n")
    (d / "texts.txt").write_text("one\ntwo\n")
    (d / "noanswer.jsonl").write_text('{"prompt": "1 + 1?", "answer": 2}\n{"prompt": "2 + 2?"}\n')
    (d / "responses.json").write_text('[{"instruction": "x", "input": "", "output": "y", "model_response": "y"}]')
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


def test_the_table_covers_every_tool_with_at_least_40_cases():
    tools = [c.values[0] if hasattr(c, "values") else c[0] for c in CASES]
    assert len(CASES) >= 40 and set(tools) == set(TOOLS)


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
