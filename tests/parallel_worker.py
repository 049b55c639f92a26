"""Three train steps of the tiny config on every device of every process; prints JSON.

Run by test_parallel.py under different device and process counts, which must agree.
`--random_flip` flips real images on the device. `--patch_forms` makes a CPU take its
patch-matrix convolutions at every layer, one image per batch chunk, as it otherwise does
only for wide layers. `--other_processor` makes this process stand for a host whose
processor picks other kernel-gradient forms (smaller chunks, the other orientation); every
process prints the forms it compiled with (`FORMS`).
`--loss`, `--gradient_penalty`, `--d_norm` and `--augment` set the config fields of those
names."""

import argparse
import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dcgan_jax import config as config_lib, parallel, step as step_lib, strided_conv  # noqa: E402
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
args = parser.parse_args()
if args.patch_forms:
    strided_conv.PATCHES_MIN_CHANNELS = strided_conv.FEW_CHANNELS
    strided_conv.CONV_CHUNK_BYTES = strided_conv.KERNEL_GRAD_CHUNK_BYTES = 1

if args.other_processor:
    # 16 KiB: one image a chunk at most layers, and a chunk in which the 512 B and 8 KB
    # kernel gradients of these narrow networks fit, so that they take the flipped
    # orientation (16C is their wider side).
    strided_conv.KERNEL_GRAD_CHUNK_BYTES = 16 * 1024
    strided_conv.KERNEL_GRAD_WIDE_MINOR = not strided_conv.KERNEL_GRAD_WIDE_MINOR

if args.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    parallel.initialize_distributed(args.coordinator_address, args.num_processes,
                                    args.process_id)

config = tiny_config(train__batch_size=8, model__msg=args.msg,
                     data__random_flip=args.random_flip, train__loss=args.loss,
                     train__gradient_penalty=args.gradient_penalty, model__d_norm=args.d_norm,
                     train__augment=args.augment)
config_lib.validate(config, jax.device_count(), jax.process_count())
mesh = parallel.make_mesh()
state = step_lib.create_train_state(config, mesh, total_steps=10)
batches = np.random.default_rng(0).integers(0, 256, (3, 1, 8, 32, 32, 1), dtype=np.uint8)
rows = 8 // jax.process_count()
local_batches = [real[:, jax.process_index() * rows:(jax.process_index() + 1) * rows]
                 for real in batches]
global_batches = [parallel.global_batch(local, mesh, batch_axis=1) for local in local_batches]
train_step = step_lib.make_train_step(config, mesh).lower(state, global_batches[0]).compile()
for real in global_batches:
    state, metrics = train_step(state, real)
result = {k: float(v) for k, v in parallel.fetch(metrics).items()}
result["loops"] = train_step.as_text().count(" while(")
result["g_params_abs_sum"] = float(sum(np.abs(x).sum() for x in
                                       jax.tree.leaves(parallel.fetch(state.g.params))))
result["devices"] = jax.device_count()
print("FORMS " + json.dumps([strided_conv.KERNEL_GRAD_CHUNK_BYTES,
                             strided_conv.KERNEL_GRAD_WIDE_MINOR]), flush=True)
if jax.process_index() == 0:
    print("RESULT " + json.dumps(result), flush=True)
