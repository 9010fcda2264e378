"""Looking inside an encoder (the ViT paper's section 4.5 and appendix D.7, and attention maps): `python -m
mpp.analyze` runs them.

    attention.py      attention maps from timm's Attention; mean attention distance; class-token maps, rollout
    visual_tokens.py  VT: each visual token's spatial attention (its tokenizer's softmax over the map)
    embeddings.py     position-embedding similarity; principal components of the first filters on the pixels
    draw.py           figures with PIL and torchvision: colour maps, tiles, scatter, panels side by side
    figures.py        the analyses, each measure (numbers) + panel (picture) of one checkpoint
"""
