"""Turn a timm training checkpoint into a Hugging Face Hub model folder, and upload it.

The folder holds ``model.safetensors`` (no pickle), timm's ``config.json`` (written by timm's own
``save_for_hf``, so ``model_args`` carry the ``ssb_*`` kwargs) and a model card ``README.md``. It loads
back with ``timm.create_model('hf-hub:ORG/NAME')``, ``'local-dir:PATH'`` or, for a registered tag,
``pretrained=True``.
"""

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import timm
import torch
from timm.models import clean_state_dict, load_state_dict, save_for_hf

from .complexity import model_complexity
from .paper import paper_figure
from .version import __version__

__all__ = [
    'PublishError',
    'read_checkpoint',
    'check_fit',
    'check_model_name',
    'build_from_checkpoint',
    'write_model_folder',
    'upload_model_folder',
    'publish',
]

CHECKPOINT_KEYS = ('state_dict_ema', 'model_ema', 'state_dict', 'model')
"""Where timm-style checkpoints keep weights, in order of preference (EMA weights first)."""

OUTPUT_FILES = ('model.safetensors', 'config.json', 'README.md')

TRAIN_ARGS_SHOWN = (
    'model',
    'model_kwargs',
    'epochs',
    'batch_size',
    'opt',
    'lr',
    'weight_decay',
    'sched',
    'warmup_epochs',
    'smoothing',
    'aa',
    'mixup',
    'img_size',
    'model_ema',
)
"""The training arguments the model card repeats (of the many timm's train.py saves)."""


class PublishError(ValueError):
    """A checkpoint that cannot be published as asked; the message says why."""


def read_checkpoint(path: str) -> Tuple[Dict[str, torch.Tensor], str, Dict[str, Any]]:
    """Read a timm training checkpoint (or a bare state dict).

    Returns:
        The state dict (``module.`` prefixes of DDP removed), which entry it came from, and the
        training arguments saved with it (empty if none).
    """
    file = Path(path)
    if not file.is_file():
        raise PublishError(f'checkpoint {path!r} does not exist or is not a file')
    try:
        if file.suffix == '.safetensors':
            return load_state_dict(str(file)), 'safetensors file', {}
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(file, map_location='cpu', weights_only=True)
    except Exception as e:  # torch and safetensors raise many types for unreadable files
        raise PublishError(f'checkpoint {path!r} could not be read ({type(e).__name__}: {e})') from e
    if not isinstance(checkpoint, dict):
        raise PublishError(f'checkpoint {path!r} holds a {type(checkpoint).__name__}, not a dict of weights')
    args = checkpoint.get('args')
    train_args = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    for key in CHECKPOINT_KEYS:
        if isinstance(checkpoint.get(key), dict) and checkpoint[key]:
            return clean_state_dict(checkpoint[key]), key, train_args
    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return clean_state_dict(checkpoint), 'state dict', {}
    raise PublishError(
        f'checkpoint {path!r} has none of the entries {", ".join(CHECKPOINT_KEYS)} and is not a bare state dict'
    )


def check_fit(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], description: str) -> None:
    """Raise :class:`PublishError` naming a few missing, unexpected and mis-shaped keys unless ``state_dict``
    fits ``model`` exactly (``description`` says what the model is, for the message)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if not (missing or unexpected or wrong_shape):
        return

    def _few(keys):
        return ', '.join(keys[:5]) + (f' and {len(keys) - 5} more' if len(keys) > 5 else '')

    parts = [
        f'{label}: {_few(keys)}'
        for label, keys in (
            ('missing keys', missing),
            ('unexpected keys', unexpected),
            ('shape mismatches', wrong_shape),
        )
        if keys
    ]
    raise PublishError(
        f'the checkpoint does not fit {description} ({"; ".join(parts)}). Is it a checkpoint of another '
        'architecture, or were other ssb_* arguments used for training (pass them with --model-args)?'
    )


def build_from_checkpoint(
    model_name: str, state_dict: Dict[str, torch.Tensor], model_args: Optional[Dict[str, Any]] = None
) -> torch.nn.Module:
    """Build ``model_name`` with the checkpoint's class count and load it, strictly."""
    check_model_name(model_name)
    model_args = dict(model_args or {})
    fc = state_dict.get('fc.weight')
    if fc is not None:
        model_args.setdefault('num_classes', fc.shape[0])
    model = timm.create_model(model_name, **model_args)
    check_fit(model, state_dict, f'{model_name} with {model_args or "default arguments"}')
    model.load_state_dict(state_dict)
    return model.eval()


def check_model_name(model_name: str) -> None:
    """Raise :class:`PublishError` unless ``model_name`` is a registered SSB architecture."""
    if model_name not in timm.list_models('ssb_*'):
        raise PublishError(f'--model must be one of {", ".join(timm.list_models("ssb_*"))}; got {model_name!r}')


def model_card(model: torch.nn.Module, model_name: str, repo_id: str, source: str, train_args: Dict[str, Any]) -> str:
    """The model card: what the model is, how to use it, the paper's numbers and ours."""
    args = dict(getattr(model, '_model_args', {}))
    sampler = getattr(model, 'ssb_sampler', 'adaptive')
    sizes = getattr(model, 'ssb_sizes', None)
    counts = model_complexity(model_name, **{k: v for k, v in args.items() if k != 'num_classes'})
    paper = paper_figure(model_name, sampler, sizes)
    converted_from = f" of timm's `{args['ssb_source']}`" if 'ssb_source' in args else ''
    paper_line = (
        f'The paper reports {paper.gmacs} GMACs and {paper.params_m}M parameters for this configuration.'
        if paper
        else 'The paper reports no complexity figure for this configuration.'
    )
    command = ' '.join(
        f'--{k.replace("_", "-")} {train_args[k]}' for k in TRAIN_ARGS_SHOWN if train_args.get(k) not in (None, '')
    )
    training = (
        f'Trained with timm `train.py --device-modules timm_ssb` and these arguments:\n\n```\n{command}\n```'
        if command
        else 'No training arguments were stored with the checkpoint.'
    )
    return f"""---
tags:
- image-classification
- timm
- ssbnet
library_name: timm
license: {model.pretrained_cfg.get('license', 'apache-2.0')}
---
# {repo_id.split('/')[-1]}

SSBNet model ({model_name}{converted_from}, sampler `{sampler}`, sizes `{sizes}`) for timm, from the `timm-ssb` package:
adaptive sampling in every stride-1 ResNet bottleneck of stages 2-4 (Kwan & Song, ECCV 2022, arXiv:2207.11511).

## Usage

```python
import timm
import timm_ssb  # registers the ssb_* architectures with timm

model = timm.create_model("hf-hub:{repo_id}", pretrained=True).eval()
```

## Model

- Parameters: {counts.params_m:.2f}M; GMACs at 224x224: {counts.gmacs:.3f} (counted with torch.utils.flop_counter).
- {paper_line}
- Classes: {model.num_classes}. Model arguments: `{json.dumps(args)}`.
- Weights: `{source}` of the training checkpoint.

## Training

{training}

Paper (ImageNet top-1, ResNet-D recipe, 120 epochs, mean of 3 runs): SSB-ResNet-D-50/101/152 at (16, 8, 4)
with RandAugment 78.22 / 79.50 / 80.12 (adaptive) vs 78.07 / 79.27 / 79.71 (uniform).

## Citation

```bibtex
@inproceedings{{kwan2022ssbnet,
  title={{SSBNet: Improving Visual Recognition Efficiency by Adaptive Sampling}},
  author={{Kwan, Ho Man and Song, Shenghui}},
  booktitle={{European Conference on Computer Vision (ECCV)}},
  year={{2022}}
}}
```
"""


def _label_config(num_classes: int) -> Dict[str, Any]:
    """ImageNet-1k synsets as label names for a 1000-class model; other class sets are not known here."""
    if num_classes != 1000:
        return {}
    from timm.data import ImageNetInfo

    return {'label_names': ImageNetInfo().label_names()}


def write_model_folder(
    model: torch.nn.Module, model_name: str, repo_id: str, out: Path, source: str, train_args: Dict[str, Any]
) -> Path:
    """Write the Hub folder into ``out``; files already there are never overwritten.

    The files get the permissions of any new file (the umask's), whatever the writers used in between.
    """
    check_out_folder(out)
    with tempfile.TemporaryDirectory() as tmp:
        save_for_hf(model, tmp, model_config=_label_config(model.num_classes), safe_serialization=True)
        (Path(tmp) / 'README.md').write_text(model_card(model, model_name, repo_id, source, train_args))
        out.mkdir(parents=True, exist_ok=True)
        for name in OUTPUT_FILES:
            shutil.copyfile(Path(tmp) / name, out / name)
    return out


def check_out_folder(out: Path) -> None:
    """Raise :class:`PublishError` unless ``out`` can take the Hub files: a folder (or none yet) without them."""
    if out.exists() and not out.is_dir():
        raise PublishError(f'--out {str(out)!r} is a file; give a folder (new, or without {", ".join(OUTPUT_FILES)})')
    clashes = [name for name in OUTPUT_FILES if (out / name).exists()]
    if clashes:
        raise PublishError(f'--out {str(out)!r} already has {", ".join(clashes)}; choose an empty or new folder')


def _hub_token(token: Optional[str]) -> str:
    """The token to upload with; a :class:`PublishError` when uploading cannot work (no token, offline)."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise PublishError('HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it, or use --dry-run')
    token = token or get_token()
    if not token:
        raise PublishError('no Hugging Face token: run `hf auth login` or set HF_TOKEN, or use --dry-run')
    return token


def upload_model_folder(folder: Path, repo_id: str, token: str, commit_message: str) -> None:
    """Upload exactly :data:`OUTPUT_FILES` of ``folder`` (nothing else that lies there) in one commit."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token, library_name='timm-ssb', library_version=__version__)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in OUTPUT_FILES]
    try:
        api.create_repo(repo_id, exist_ok=True)
        api.create_commit(repo_id=repo_id, operations=operations, commit_message=commit_message)
    except Exception as e:  # the Hub client raises HTTP, connection and OS errors of many types
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ''
        raise PublishError(
            f'uploading to {repo_id!r} failed ({type(e).__name__}: {reason}); the folder {str(folder)!r} is complete, '
            'so you can retry or upload it yourself'
        ) from e


def publish(
    checkpoint: str,
    model_name: str,
    repo_id: str,
    out: Optional[str] = None,
    dry_run: bool = False,
    model_args: Optional[Dict[str, Any]] = None,
    token: Optional[str] = None,
) -> Path:
    """Check, convert and (unless ``dry_run``) upload a checkpoint; returns the folder written.

    ``model_args`` default to the ``model_kwargs`` saved with the checkpoint by timm's ``train.py``.
    Everything that can be checked before writing is: the repository name, the model name, ``out``,
    and (for an upload) the token and offline mode. Only the files written here are uploaded.
    """
    if repo_id.count('/') != 1 or not all(repo_id.split('/')):
        raise PublishError(f'--repo-id must be ORG/NAME; got {repo_id!r}')
    check_model_name(model_name)
    folder = Path(out) if out else None
    if folder is not None:
        check_out_folder(folder)
    token = None if dry_run else _hub_token(token)
    state_dict, source, train_args = read_checkpoint(checkpoint)
    print(f'using weights from {source!r} of {checkpoint}')
    if model_args is None and train_args.get('model_kwargs'):
        model_args = dict(train_args['model_kwargs'])
        print(f'using model arguments saved with the checkpoint: {model_args}')
    model = build_from_checkpoint(model_name, state_dict, model_args)
    folder = folder or Path(tempfile.mkdtemp(prefix='timm-ssb-publish-'))
    write_model_folder(model, model_name, repo_id, folder, source, train_args)
    print(f'wrote {", ".join(OUTPUT_FILES)} to {folder}')
    if token is None:
        return folder
    upload_model_folder(folder, repo_id, token, commit_message=f'Add {model_name} weights')
    print(f'uploaded {", ".join(OUTPUT_FILES)} to https://huggingface.co/{repo_id}')
    return folder
