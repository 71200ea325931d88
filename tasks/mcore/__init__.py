"""Megatron-Core checkpoints (torch_dist and legacy mp_rank_*), read without Megatron or torch.distributed.

Readers turn either format into one `McoreIndex`: every parameter as a global tensor whose chunks are
byte ranges in the checkpoint's files. Planning to Hugging Face names works on that index alone.
"""
