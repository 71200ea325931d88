"""Demo and test data: small synthetic checkpoints with real layouts (DeepSeek-V3 FP8 block
scales with ragged edges, Llama/Qwen q/k/v + gate/up; `synthetic_sparse.py`: a sparse file of
DeepSeek-V3's full shapes for planning benchmarks). `ckptflow demo`, the tests and the benches
generate from here; torch is needed to generate, never to import ckptflow.
"""
