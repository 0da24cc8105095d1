"""One rank of the tensor-parallel parity check (run by tests/test_tp.py under torchrun, gloo, CPU).

Each rank builds the whole HF reference (same seed: the same weights everywhere) and its FMS shard, runs the whole
parity engine (every rank must, the sharded modules communicate), and compares greedy generation with HF's. Rank 0
writes what it found as JSON to the path given.
"""

import json
import sys

import torch
import torch.distributed as dist

from fms_granite_speech.config import get_config
from fms_granite_speech.generation import transcribe_ids
from parity.compare import run_parity
from parity.inputs import build_inputs
from parity.pair import build_pair

torch.set_num_threads(1)
out_path = sys.argv[1]
# tiny with an untied head, seed 1: a greedy continuation that varies (a tied random head repeats one token)
config = get_config("tiny")
config = config.replace(decoder=config.decoder.updated(tie_heads=False))
pair = build_pair("tiny", seed=1, config=config, distributed="tp")
inputs = build_inputs(pair)
result = run_parity(pair, inputs)
with torch.no_grad():
    hf_tokens = pair.hf.generate(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                                 input_features=inputs.input_features, input_features_mask=inputs.input_features_mask,
                                 max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)[:, -32:]
fms_tokens = transcribe_ids(pair.fms, inputs.input_ids, inputs.input_features, inputs.input_features_mask,
                            attention_mask=inputs.attention_mask, max_new_tokens=32)[:, -32:]
block = pair.fms.decoder.base_model.layers[0]
if dist.get_rank() == 0:
    with open(out_path, "w") as f:
        json.dump({"world_size": dist.get_world_size(), "result": result.to_dict(),
                   "hf_tokens": hf_tokens.tolist(), "fms_tokens": fms_tokens.tolist(),
                   "attn_type": type(block.attn).__name__, "mlp_type": type(block.ff_sub_layer).__name__,
                   "local_qkv_rows": int(block.attn.in_proj.qkv_fused.weight.shape[0]),
                   "full_qkv_rows": (pair.config.decoder.nheads + 2 * pair.config.decoder.kvheads)
                   * pair.config.decoder.head_dim}, f)
dist.barrier()
dist.destroy_process_group()
