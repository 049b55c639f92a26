"""Three train steps of the tiny config on every device of every process; prints JSON.

Run by test_parallel.py under different device and process counts, which must agree.
`--random_flip` flips real images on the device. `--patch_forms` makes a CPU take its
patch-matrix convolutions at every layer, one image per batch chunk, as it otherwise does
only for wide layers. `--other_processor` makes this process stand for a host whose
processor picks other kernel-gradient forms (smaller chunks, the other orientation); every
process prints the forms it compiled with (`FORMS`).
`--loss`, `--gradient_penalty`, `--d_norm`, `--augment`, `--num_classes`, `--g_cond` and
`--d_cond` set the config fields of those names (batches carry labels of 10 classes)."""

import argparse
import dataclasses
import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dcgan_jax import cli, parallel, strided_conv  # noqa: E402
from dcgan_jax import config as config_lib  # noqa: E402
from dcgan_jax import step as step_lib  # noqa: E402

from tiny_config import tiny_config  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--num_processes", type=int, default=1)
parser.add_argument("--process_id", type=int, default=0)
parser.add_argument("--coordinator_address", default=None)
parser.add_argument("--msg", action="store_true")
parser.add_argument("--patch_forms", action="store_true")
parser.add_argument("--other_processor", action="store_true")
parser.add_argument("--random_flip", action="store_true")
parser.add_argument("--loss", default="ns")
parser.add_argument("--gradient_penalty", default="none")
parser.add_argument("--d_norm", default="batch")
parser.add_argument("--augment", default="")
parser.add_argument("--num_classes", type=int, default=0)
parser.add_argument("--g_cond", default="cbn")
parser.add_argument("--d_cond", default="projection")
args = parser.parse_args()
cli.set_up_process()  # the random streams of the command lines and the in-process tests

forms = strided_conv.CpuForms.of_host()
if args.patch_forms:
    forms = dataclasses.replace(forms, patches_min_channels=strided_conv.FEW_CHANNELS,
                                conv_chunk_bytes=1, kernel_grad_chunk_bytes=1)
if args.other_processor:
    # 16 KiB: one image a chunk at most layers, and a chunk in which the 512 B and 8 KB
    # kernel gradients of these narrow networks fit, so that they take the flipped
    # orientation (16C is their wider side).
    forms = dataclasses.replace(forms, kernel_grad_chunk_bytes=16 * 1024,
                                kernel_grad_wide_minor=not forms.kernel_grad_wide_minor)

if args.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    parallel.initialize_distributed(args.coordinator_address, args.num_processes,
                                    args.process_id)
forms, change = strided_conv.agree_across_processes(forms)
if change:
    print(change, file=sys.stderr, flush=True)

config = tiny_config(train__batch_size=8, model__msg=args.msg,
                     data__random_flip=args.random_flip, train__loss=args.loss,
                     train__gradient_penalty=args.gradient_penalty, model__d_norm=args.d_norm,
                     train__augment=args.augment, model__num_classes=args.num_classes,
                     model__g_cond=args.g_cond, model__d_cond=args.d_cond)
config_lib.validate(config, jax.device_count(), jax.process_count())
mesh = parallel.make_mesh()
state = step_lib.create_train_state(config, mesh, total_steps=10)
rng = np.random.default_rng(0)
batches = [{"image": rng.integers(0, 256, (1, 8, 32, 32, 1), dtype=np.uint8),
            "label": rng.integers(0, 10, (1, 8), dtype=np.int32)} for _ in range(3)]
rows = 8 // jax.process_count()
local_batches = [{key: value[:, jax.process_index() * rows:(jax.process_index() + 1) * rows]
                  for key, value in batch.items()} for batch in batches]
global_batches = [parallel.global_batch(local, mesh, batch_axis=1) for local in local_batches]
train_step = step_lib.make_train_step(config, mesh, forms).lower(state, global_batches[0]).compile()
for batch in global_batches:
    state, metrics = train_step(state, batch)
result = {k: float(v) for k, v in parallel.fetch(metrics).items()}
result["loops"] = train_step.as_text().count(" while(")
result["g_params_abs_sum"] = float(sum(np.abs(x).sum() for x in
                                       jax.tree.leaves(parallel.fetch(state.g.params))))
result["devices"] = jax.device_count()
print("FORMS " + json.dumps(dataclasses.asdict(forms)), flush=True)
if jax.process_index() == 0:
    print("RESULT " + json.dumps(result), flush=True)
