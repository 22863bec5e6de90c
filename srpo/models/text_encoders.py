"""Flagship text encoders' architectures (the fields of their published ``config.json`` that
set the shapes), for ``srpo plan`` without a folder: built on the meta device they count each
encoder whole (each equals its family's parameter constant: tests/test_parallel.py) and
streamed (:func:`srpo.models.base.text_stream_plan`). A folder's own configs take their place."""

# openai/clip-vit-large-patch14's text model (FLUX.1's text_encoder, SD3's text_encoder with its projection)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              vocab_size=49408, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
# OpenCLIP ViT-bigG/14's text model (SD3's text_encoder_2)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              vocab_size=49408, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")
# google/t5-v1_1-xxl's encoder (FLUX.1's text_encoder_2, SD3's text_encoder_3)
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
              relative_attention_max_distance=128, tie_word_embeddings=False)
# google/umt5-xxl's encoder (Wan's text_encoder)
UMT5_XXL = dict(T5_XXL, vocab_size=256384)
# Qwen/Qwen2.5-VL-7B-Instruct (Qwen-Image's text_encoder): the language model and its vision tower
QWEN25_VL_7B = dict(
    text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
                     rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_chans=3, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31]),
    tie_word_embeddings=False)
