"""Model repositories for the benchmarks, derived from an exported one (models/demo or
models/full) without re-exporting anything:

- `cloned_repository`: the source backbone plus N task adapters, each a copy of one template
  adapter under its own task name (`task-000`, `task-001`, ...). The copies share one
  preprocessing, as the paper's tasks do, so one backbone run serves them all. Weights are
  identical, which changes neither compute nor memory: every adapter is its own ONNX Runtime
  session either way.
- `fused_model`: backbone.onnx and side.onnx merged into one graph (pixels in, logits out),
  which is what a one-model-per-task server runs for each fine-tuned task.
- `reduced_repository`: a repository plus, for every task version, a copy `<task>-reduced`
  that opts into reduced-resolution DICOM decoding (same ONNX files).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Adapter:
    """One task version of a repository, as the benchmarks need it."""

    repository: Path
    task: str
    version: str
    manifest: dict

    @property
    def folder(self) -> Path:
        return self.repository / "tasks" / self.task / self.version

    @property
    def side_onnx(self) -> Path:
        return self.folder / self.manifest["file"]

    @property
    def backbone_name(self) -> str:
        return self.manifest["backbone"]["name"]

    @property
    def backbone_onnx(self) -> Path:
        folder = self.repository / "backbones" / self.backbone_name
        backbone = json.loads((folder / "manifest.json").read_text())
        return folder / backbone["file"]

    @property
    def spec(self) -> str:
        return f"{self.task}@{self.version}"


def adapter(repository: Path, task: str, version: str) -> Adapter:
    folder = repository / "tasks" / task / version
    return Adapter(repository, task, version, json.loads((folder / "manifest.json").read_text()))


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _complete(out: Path) -> bool:
    """True when an earlier run finished writing `out`; otherwise clears what it left."""
    if (out / ".complete").exists():
        return True
    if out.exists():
        shutil.rmtree(out)
    return False


def clone_name(i: int) -> str:
    return f"task-{i:03d}"


def cloned_repository(work: Path, template: Adapter, count: int) -> Path:
    """A repository with the template's backbone and `count` copies of the template adapter."""
    out = work / "repos" / f"{template.backbone_name}-{template.task}-{count}"
    if _complete(out):
        return out
    source_backbone = template.repository / "backbones" / template.backbone_name
    for f in source_backbone.iterdir():
        _link_or_copy(f, out / "backbones" / template.backbone_name / f.name)
    (out / "tasks").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        folder = out / "tasks" / clone_name(i) / "1"
        manifest = dict(template.manifest, task=clone_name(i), version="1")
        _link_or_copy(template.side_onnx, folder / template.manifest["file"])
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (out / ".complete").write_text("")
    return out


def staged_version(repository: Path, task: str, version: str) -> Path:
    """A copy of `task`'s version 1 as `version`, in a folder outside tasks/ (so it is loaded
    only through the admin API), inside the repository."""
    source = repository / "tasks" / task / "1"
    out = repository / "staged" / f"{task}-{version}"
    manifest = json.loads((source / "manifest.json").read_text())
    if not (out / manifest["file"]).exists():
        _link_or_copy(source / manifest["file"], out / manifest["file"])
    (out / "manifest.json").write_text(json.dumps(dict(manifest, version=version), indent=2) + "\n")
    return out


def fused_model(work: Path, template: Adapter) -> Path:
    """backbone.onnx + side.onnx as one ONNX graph: inputs `pixel_values` and
    `side_pixel_values`, output `logits`."""
    import onnx
    from onnx import compose

    out = work / "fused" / f"{template.backbone_name}-{template.task}-{template.version}.onnx"
    if out.exists():
        return out
    backbone = onnx.load(str(template.backbone_onnx))
    side = onnx.load(str(template.side_onnx))
    side_inputs = {i.name for i in side.graph.input}
    kv = [o.name for o in backbone.graph.output if o.name in side_inputs]
    fused = compose.merge_models(
        backbone, side, io_map=[(name, name) for name in kv], prefix1="backbone.", prefix2="side.",
        outputs=["side.logits"],
    )
    renames = {"backbone.pixel_values": "pixel_values", "side.side_pixel_values": "side_pixel_values",
               "side.logits": "logits"}
    for node in fused.graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    for value in list(fused.graph.input) + list(fused.graph.output):
        value.name = renames.get(value.name, value.name)
    onnx.checker.check_model(fused)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    onnx.save(fused, str(partial))
    partial.rename(out)
    return out


REDUCED_SUFFIX = "-reduced"


def reduced_repository(work: Path, source: Path) -> Path:
    """`source`'s backbones and task versions, and for each task version a copy named
    `<task>-reduced` whose manifest sets preprocessing.dicom.decode_resolution "reduced"; the
    ONNX files are shared (hard links)."""
    out = work / "repos" / f"reduced-{source.name}"
    if _complete(out):
        return out
    for f in (source / "backbones").rglob("*"):
        if f.is_file():
            _link_or_copy(f, out / f.relative_to(source))
    for manifest_path in sorted((source / "tasks").glob("*/*/manifest.json")):
        folder = manifest_path.parent
        task, version = folder.parent.name, folder.name
        for name in (task, task + REDUCED_SUFFIX):
            target = out / "tasks" / name / version
            for f in folder.iterdir():
                if f.is_file() and f.name != "manifest.json":
                    _link_or_copy(f, target / f.name)
            manifest = json.loads(manifest_path.read_text())
            if name != task:
                manifest["task"] = name
                manifest["preprocessing"].setdefault("dicom", {"voi": "auto"})["decode_resolution"] = "reduced"
            (target / "manifest.json").write_text(json.dumps(manifest, indent=2))
    (out / ".complete").write_text("")
    return out


def reduced_pairs(repository: Path) -> list[tuple[str, str]]:
    """(task@version, its reduced copy) for every original task version of a reduced repository."""
    pairs = []
    for manifest_path in sorted((repository / "tasks").glob("*/*/manifest.json")):
        task, version = manifest_path.parent.parent.name, manifest_path.parent.name
        if not task.endswith(REDUCED_SUFFIX):
            pairs.append((f"{task}@{version}", f"{task}{REDUCED_SUFFIX}@{version}"))
    return pairs
