"""``gptlab-config``: list gptlab's configs and presets, show one, or copy one into a folder of your own
to edit (as torchtune's ``tune ls`` / ``tune cp``). Your folder joins the search path with
``--config-dir``; its presets compose with gptlab's groups.

    gptlab-config ls                                   # every group and option, with its first comment line
    gptlab-config ls experiment                        # one group
    gptlab-config show experiment/ch06_spam            # print a config file
    gptlab-config cp experiment/ch06_spam my_configs/  # -> my_configs/experiment/ch06_spam.yaml
    gptlab-config cp experiment/ch06_spam my_configs/experiment/my_spam.yaml
    gptlab-train --config-dir my_configs experiment=my_spam
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Sequence

from gptlab.config_tree import CONFIG_DIR, describe, groups, primary_configs

def resolve(name: str, root: Path = Path(CONFIG_DIR)) -> Path:
    """``experiment/ch06_spam`` (``.yaml`` optional) or ``train`` -> the file; a clear error listing
    the options of the group otherwise."""
    rel = name.removesuffix(".yaml")
    path = root / f"{rel}.yaml"
    if path.is_file():
        return path
    group = rel.rpartition("/")[0]
    options = groups(root).get(group)
    if options is None:
        valid = sorted(groups(root)) + primary_configs(root)
        raise SystemExit(f"gptlab-config: no config {name!r}; groups and primary configs: {', '.join(valid)}")
    raise SystemExit(f"gptlab-config: no option {rel.rpartition('/')[2]!r} in group {group!r}; "
                     f"options: {', '.join(options)}")


def list_configs(group: str | None, root: Path = Path(CONFIG_DIR)) -> str:
    """Every primary config and every option of every group (or of ``group`` only), each with the
    first sentence of its header comment."""
    found = groups(root)
    if group is not None and group not in found:
        raise SystemExit(f"gptlab-config: no group {group!r}; groups: {', '.join(sorted(found))}")
    entries: list[tuple[str | None, str, Path]] = []  # (heading it starts, name, file)
    if group is None:
        entries += [(None, n, root / f"{n}.yaml") for n in primary_configs(root)]
    for g in sorted(found):
        if group in (None, g):
            entries += [(g if i == 0 else None, f"{g}/{o}", root / g / f"{o}.yaml") for i, o in enumerate(found[g])]
    width = max(30, *(len(name) + 1 for _, name, _ in entries))
    lines = ["primary configs (one per tool: gptlab-<name>):"] if group is None else []
    for heading, name, path in entries:
        if heading:
            lines.append(f"{heading}:")
        lines.append(f"  {name:<{width}} {describe(path)}".rstrip())
    return "\n".join(lines) + "\n"


def copy_config(name: str, dest: str | Path, root: Path = Path(CONFIG_DIR), force: bool = False) -> Path:
    """Copy config ``name`` into ``dest``: a folder (the group path is kept, so ``--config-dir dest``
    finds it) or a ``.yaml`` file path. Refuses to overwrite unless ``force``."""
    src = resolve(name, root)
    dest = Path(dest)
    target = dest if dest.suffix == ".yaml" else dest / src.relative_to(root)
    if target.exists() and not force:
        raise SystemExit(f"gptlab-config: {target} exists; pass --force to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, target)
    return target


def usage_hint(target: Path, rel: Path) -> str:
    """How to use a copied config: the ``--config-dir`` whose group folder holds it."""
    group = rel.parent
    if not group.parts:
        return f"use it: gptlab-{'eval' if target.stem == 'eval' else target.stem} --config-dir {target.parent}"
    if target.parent.parts[-len(group.parts):] != group.parts:
        return f"for --config-dir to find it, keep it in a folder named {group}/ (e.g. my_configs/{group}/)"
    config_dir = target.parents[len(group.parts)]
    return f"use it: gptlab-train --config-dir {config_dir} {group.as_posix()}={target.stem}"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gptlab-config", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("ls", help="list groups and options")
    ls.add_argument("group", nargs="?", help="only this group (e.g. experiment)")
    show = sub.add_parser("show", help="print one config file")
    show.add_argument("name", help="e.g. experiment/ch06_spam, or train")
    cp = sub.add_parser("cp", help="copy one config into your own folder")
    cp.add_argument("name", help="e.g. experiment/ch06_spam")
    cp.add_argument("dest", help="a folder (keeps the group path) or a .yaml file")
    cp.add_argument("--force", action="store_true", help="overwrite an existing file")
    args = ap.parse_args(argv)
    if args.command == "ls":
        sys.stdout.write(list_configs(args.group))
    elif args.command == "show":
        sys.stdout.write(resolve(args.name).read_text())
    else:
        target = copy_config(args.name, args.dest, force=args.force)
        print(f"copied {args.name} to {target}")
        print(usage_hint(target, resolve(args.name).relative_to(Path(CONFIG_DIR))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
