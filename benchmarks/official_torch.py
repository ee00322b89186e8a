#!/usr/bin/env python3
"""Times the OFFICIAL PyTorch DAMO-YOLO code on this machine, for side-by-side ratios with damo_jax.

Nothing here is imported by damo_jax or its tests. It needs a checkout of tinyvision/DAMO-YOLO and a
separate virtualenv with CPU torch (not damo_jax's), e.g.::

    git clone https://github.com/tinyvision/DAMO-YOLO /path/DAMO-YOLO
    python3 -m venv /path/venv && /path/venv/bin/pip install torch easydict loguru tabulate thop \
        opencv-python-headless
    /path/venv/bin/python benchmarks/official_torch.py --repo /path/DAMO-YOLO --mode train \
        --config s --img-size 320 --batch 8 --num-gt 5 --steps 12          # training step
    /path/venv/bin/python benchmarks/official_torch.py --repo /path/DAMO-YOLO --mode infer \
        --config t --img-size 640 --runs 30                                 # batch-1 deploy forward

``--device cuda`` (a CUDA torch in the venv) runs the same on a GPU, each timed step ending with
``torch.cuda.synchronize()`` (``benchmarks/gpu_check.sh``). Run it alternately with
``benchmarks/train_step.py`` / ``benchmarks/model_latency.py`` (same sizes) and take per-round
ratios (``benchmarks/side_by_side.py`` does this for the training step): docs/BENCHMARKS.md "Side by side with the official code" has the commands and results.
The last stdout line is one JSON object.

Checkout adjustments used for the 2026-12-03 measurements (no network there, so the checkout was
assembled from stored copies of the repository's files): ``from .apis import *`` in
``damo/__init__.py`` commented out (it imports the dataset code and pycocotools, which the model
path does not need); ``'legacy': False`` in the T and S configs' ZeroHead where older configs are
stored (the current configs have it, SPEC.md §1.2; the parameter counts then match SPEC §1.7: T
8.876 M / 8.480 M reparameterised, S 16.936 M / 16.252 M; without it S counts 16.944 M); empty ``__init__.py`` files where a package folder
had none; for ``--config ns`` (added 2026-12-03) ``configs/damoyolo_tinynasL18_Ns.py`` and
``damo/base_models/backbones/nas_backbones/tinynas_nano_small.txt`` as stored (1.41 M parameters,
SPEC §1.7: 1.406 M), trained with the config's AdamW. torchvision is optional: where it cannot be
imported, a pure-torch ``batched_nms`` stands in (used only by ``--nms``).

* ``train``: one step = ``model(images, targets)`` (the detector returns the loss dict in train
  mode: forward, AlignOTA assignment, losses) + ``backward()`` + ``optimizer.step()``; the official
  trainer's optimizer (the config's: SGD, momentum 0.9, nesterov, weight decay 5e-4 for T/S; AdamW,
  weight decay 1e-2 for Ns; none on norm weights and biases), fixed lr, plain BatchNorm (one
  process), EMA only with ``--ema``; images random 0-255 NCHW float, ``--num-gt`` boxes per image
  with log-uniform sides 12-160 px, random labels of 80 classes, all made before timing. The
  official trainer itself is not used (CUDA, DDP, data loader).
* ``infer``: batch 1, eval mode, the official deploy form: every RepConv ``switch_to_deploy()`` then
  ``damo.utils.fuse_model`` (``tools/eval.py --fuse``), head NMS off (scores (1, A, 80) + boxes
  (1, A, 4), what the exported graph outputs), ``torch.no_grad()``.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time
import types


CONFIGS = {
    's': 'configs/damoyolo_tinynasL25_S.py',
    't': 'configs/damoyolo_tinynasL20_T.py',
    'ns': 'configs/damoyolo_tinynasL18_Ns.py',     # AdamW recipe; needs nas_backbones/tinynas_nano_small.txt
}


def _install_torchvision_shim():
    """damo/utils/boxes.py does `import torchvision` and uses only
    torchvision.ops.batched_nms (eval-time NMS).  The only torchvision wheels
    reachable here are CUDA builds whose _C.so cannot load next to torch+cpu, so
    if the real import fails we register a tiny pure-torch stand-in.  It is not
    called at all in train mode or in infer mode without --nms."""
    try:
        import torchvision  # noqa: F401
        return 'torchvision ' + torchvision.__version__
    except Exception:
        for k in [k for k in sys.modules if k == 'torchvision' or k.startswith('torchvision.')]:
            del sys.modules[k]
    import torch

    def nms(boxes, scores, iou_threshold):
        order = scores.argsort(descending=True)
        boxes = boxes[order]
        x1, y1, x2, y2 = boxes.unbind(1)
        areas = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
        suppressed = torch.zeros(len(order), dtype=torch.bool)
        keep = []
        for i in range(len(order)):
            if suppressed[i]:
                continue
            keep.append(i)
            xx1 = torch.maximum(x1[i], x1[i + 1:])
            yy1 = torch.maximum(y1[i], y1[i + 1:])
            xx2 = torch.minimum(x2[i], x2[i + 1:])
            yy2 = torch.minimum(y2[i], y2[i + 1:])
            inter = (xx2 - xx1).clamp(min=0) * (yy2 - yy1).clamp(min=0)
            iou = inter / (areas[i] + areas[i + 1:] - inter)
            suppressed[i + 1:] |= iou > iou_threshold
        return order[torch.tensor(keep, dtype=torch.long)]

    def batched_nms(boxes, scores, idxs, iou_threshold):
        if boxes.numel() == 0:
            return torch.empty((0, ), dtype=torch.int64, device=boxes.device)
        offsets = idxs.to(boxes) * (boxes.max() + 1)
        return nms(boxes + offsets[:, None], scores, iou_threshold)

    tv = types.ModuleType('torchvision')
    ops = types.ModuleType('torchvision.ops')
    ops.nms = nms
    ops.batched_nms = batched_nms
    tv.ops = ops
    tv.__version__ = 'shim(pure-torch batched_nms)'
    sys.modules['torchvision'] = tv
    sys.modules['torchvision.ops'] = ops
    return 'torchvision shim (pure-torch batched_nms; real torchvision not importable)'


def build_official_optimizer(model, lr, opt_cfg=None):
    """Same grouping as damo/apis/detector_trainer.py Trainer.build_optimizer
    with the config's train.optimizer (base config: SGD, momentum 0.9, wd 5e-4,
    nesterov True; the nano configs: AdamW, wd 1e-2): the torch.optim class of
    that name with the dict's other entries; lr is set by the scheduler in the
    official loop (here: ``lr``)."""
    import torch
    from torch.nn import GroupNorm, LayerNorm
    from torch.nn.modules.batchnorm import _BatchNorm
    NORMS = (GroupNorm, LayerNorm, _BatchNorm)
    param_dict = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        assert param not in param_dict
        param_dict[param] = {'name': name}
    for name, m in model.named_modules():
        if isinstance(m, NORMS):
            if hasattr(m, 'bias') and m.bias is not None:
                param_dict[m.bias].update({'weight_decay': 0})
            param_dict[m.weight].update({'weight_decay': 0})
    for name, m in model.named_modules():
        if hasattr(m, 'bias') and m.bias is not None:
            param_dict[m.bias].update({'weight_decay': 0})
    param_groups = []
    for p, pconfig in param_dict.items():
        pconfig.pop('name', None)
        param_groups += [{'params': p, **pconfig}]
    opt_cfg = dict(opt_cfg or {'name': 'SGD', 'momentum': 0.9, 'weight_decay': 5e-4, 'nesterov': True})
    cls = getattr(torch.optim, opt_cfg.pop('name'))
    opt_cfg['lr'] = lr
    return cls(param_groups, **opt_cfg)


def make_targets(batch, img_size, num_gt, num_classes, gen):
    import torch
    from damo.structures.bounding_box import BoxList
    targets = []
    lo, hi = math.log(12.0), math.log(min(160.0, img_size - 1.0))
    for _ in range(batch):
        wh = torch.exp(lo + (hi - lo) * torch.rand(num_gt, 2, generator=gen))
        xy = torch.rand(num_gt, 2, generator=gen) * (img_size - wh)
        boxes = torch.cat([xy, xy + wh], dim=1)
        labels = torch.randint(0, num_classes, (num_gt, ), generator=gen)
        t = BoxList(boxes, (img_size, img_size), mode='xyxy')
        t.add_field('labels', labels)  # 0-based class ids (current code)
        targets.append(t)
    return targets


def synchronizer(device):
    """What a timed region calls before reading the clock: waits for the GPU's queued work."""
    import torch
    return torch.cuda.synchronize if device.startswith('cuda') else (lambda: None)


def med(xs):
    return statistics.median(xs) if xs else float('nan')


def run_train(args, model, cfg):
    import torch
    model.train()
    if args.optim == 'official':
        opt = build_official_optimizer(model, args.lr, cfg.train.optimizer)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9,
                              weight_decay=5e-4)
    ema = None
    if args.ema:  # official ema_model (detector_trainer.py), optional
        from copy import deepcopy
        ema = deepcopy(model).eval()
        for p in ema.parameters():
            p.requires_grad_(False)

    gen = torch.Generator().manual_seed(args.seed)
    n_total = args.warmup + args.steps
    batches = []
    for _ in range(n_total):
        imgs = torch.rand(args.batch, 3, args.img_size, args.img_size,
                          generator=gen) * 255.0
        targets = make_targets(args.batch, args.img_size, args.num_gt, 80, gen)
        batches.append((imgs.to(args.device), [t.to(args.device) for t in targets]))
    sync = synchronizer(args.device)

    step_t, fwd_t, bwd_t = [], [], []
    for it, (imgs, targets) in enumerate(batches):
        sync()
        t0 = time.perf_counter()
        outputs = model(imgs, targets)
        loss = outputs['total_loss']
        sync()
        t1 = time.perf_counter()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ema is not None:
            d = 0.9998 * (1 - math.exp(-it / 2000))
            sd = model.state_dict()
            with torch.no_grad():
                for name, p in ema.state_dict().items():
                    if p.dtype.is_floating_point:
                        p *= d
                        p += (1.0 - d) * sd[name].detach()
        sync()
        t2 = time.perf_counter()
        tag = 'warmup' if it < args.warmup else 'step'
        print(f'{tag} {it:3d}: total {t2 - t0:.3f} s  fwd+loss {t1 - t0:.3f} s  '
              f'bwd+step {t2 - t1:.3f} s  loss {loss.item():.4f} '
              f"(cls {float(outputs['loss_cls'].detach()):.4f} bbox {float(outputs['loss_bbox'].detach()):.4f} "
              f"dfl {float(outputs['loss_dfl'].detach()):.4f})", flush=True)
        if it >= args.warmup:
            step_t.append(t2 - t0)
            fwd_t.append(t1 - t0)
            bwd_t.append(t2 - t1)
    m = med(step_t)
    return {
        'steps': len(step_t),
        'median_step_s': round(m, 4),
        'images_per_s': round(args.batch / m, 3),
        'median_fwd_loss_s': round(med(fwd_t), 4),
        'median_bwd_step_s': round(med(bwd_t), 4),
        'min_step_s': round(min(step_t), 4),
        'optim': args.optim + ('+ema' if args.ema else ''),
    }


def run_infer(args, model, cfg):
    import torch
    from damo.base_models.core.ops import RepConv
    from damo.utils import fuse_model
    model.eval()
    deploy = []
    if not args.no_reparam:
        for layer in model.modules():
            if isinstance(layer, RepConv):
                layer.switch_to_deploy()
        deploy.append('reparam')
    if not args.no_fuse:
        model = fuse_model(model)
        deploy.append('fuse')
    model.head.nms = bool(args.nms)
    print(f'deploy form {"+".join(deploy) or "train-graph"}: params '
          f'{sum(p.numel() for p in model.parameters()) / 1e6:.3f} M', flush=True)

    gen = torch.Generator().manual_seed(args.seed)
    x = (torch.rand(1, 3, args.img_size, args.img_size, generator=gen) * 255.0).to(args.device)
    sync = synchronizer(args.device)
    times = []
    with torch.no_grad():
        for i in range(args.warmup + args.runs):
            sync()
            t0 = time.perf_counter()
            out = model(x)
            sync()
            t1 = time.perf_counter()
            if i == 0:
                if isinstance(out, (tuple, list)) and len(out) == 2 and \
                        hasattr(out[0], 'shape'):
                    print('output: scores', tuple(out[0].shape), 'boxes',
                          tuple(out[1].shape), flush=True)
                else:
                    print('output:', out, flush=True)
            tag = 'warmup' if i < args.warmup else 'run'
            print(f'{tag} {i:3d}: {1000 * (t1 - t0):.1f} ms', flush=True)
            if i >= args.warmup:
                times.append(1000 * (t1 - t0))
    return {
        'runs': len(times),
        'median_ms': round(med(times), 2),
        'min_ms': round(min(times), 2),
        'mean_ms': round(sum(times) / len(times), 2),
        'deploy': '+'.join(deploy) or 'train-graph',
        'nms': bool(args.nms),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--repo', default=os.environ.get('DAMO_YOLO_REPO'),
                    help='checkout of tinyvision/DAMO-YOLO (default: env DAMO_YOLO_REPO)')
    ap.add_argument('--mode', choices=['train', 'infer'], default='train')
    ap.add_argument('--config', choices=sorted(CONFIGS), default=None,
                    help='s (default for train) or t (default for infer)')
    ap.add_argument('--img-size', type=int, default=None,
                    help='default 320 (train) / 640 (infer)')
    ap.add_argument('--batch', type=int, default=8, help='train batch (infer is always 1)')
    ap.add_argument('--num-gt', type=int, default=5)
    ap.add_argument('--steps', type=int, default=12)
    ap.add_argument('--runs', type=int, default=30)
    ap.add_argument('--warmup', type=int, default=None,
                    help='default 2 (train) / 3 (infer)')
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--device', default='cpu',
                    help="torch device: cpu (default) or cuda (then every timed step ends with "
                         "torch.cuda.synchronize())")
    ap.add_argument('--lr', type=float, default=0.01)
    ap.add_argument('--optim', choices=['official', 'plain'], default='official',
                    help='official: per-param groups, nesterov, no decay on norm/bias; '
                         'plain: one group SGD(momentum .9, wd 5e-4)')
    ap.add_argument('--ema', action='store_true', help='also do the official EMA update per step')
    ap.add_argument('--no-reparam', action='store_true')
    ap.add_argument('--no-fuse', action='store_true')
    ap.add_argument('--nms', action='store_true', help='infer: keep the head NMS (postprocess)')
    ap.add_argument('--seed', type=int, default=0)
    args = ap.parse_args()
    if not args.repo or not os.path.isfile(os.path.join(args.repo, 'damo', '__init__.py')):
        ap.error(f'--repo: not a DAMO-YOLO checkout (no damo/__init__.py): {args.repo!r}')
    repo = os.path.abspath(args.repo)
    if args.config is None:
        args.config = 's' if args.mode == 'train' else 't'
    if args.img_size is None:
        args.img_size = 320 if args.mode == 'train' else 640
    if args.warmup is None:
        args.warmup = 2 if args.mode == 'train' else 3

    if args.device == 'cpu':
        os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
    import torch
    if args.device != 'cpu' and not (args.device.startswith('cuda') and torch.cuda.is_available()):
        ap.error(f'--device {args.device}: this torch ({torch.__version__}) sees no CUDA device')
    torch.set_num_threads(args.threads)
    tv = _install_torchvision_shim()

    # the official configs read the NAS structure with a path relative to the
    # repository root ('./damo/base_models/...'), as the official tools do
    os.chdir(repo)
    sys.path.insert(0, repo)
    from damo.config.base import parse_config
    from damo.detectors.detector import build_local_model

    torch.manual_seed(args.seed)
    cfg = parse_config(os.path.join(repo, CONFIGS[args.config]))
    model = build_local_model(cfg, args.device)
    n_params = sum(p.numel() for p in model.parameters())
    dev = torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'
    print(f'torch {torch.__version__} on {dev}, threads {torch.get_num_threads()}, {tv}; '
          f'config {CONFIGS[args.config]}, params {n_params / 1e6:.2f} M, '
          f'img {args.img_size}, mode {args.mode}', flush=True)

    if args.mode == 'train':
        res = run_train(args, model, cfg)
        batch = args.batch
    else:
        res = run_infer(args, model, cfg)
        batch = 1
    line = {'impl': 'official-torch', 'mode': args.mode, 'torch': torch.__version__,
            'config': args.config, 'img_size': args.img_size, 'batch': batch,
            'threads': args.threads, 'device': dev}
    if args.mode == 'train':
        line['num_gt'] = args.num_gt
    line.update(res)
    print(json.dumps(line), flush=True)


if __name__ == '__main__':
    main()
