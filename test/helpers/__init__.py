"""Test helpers: case definitions with their float64 references (``*_cases``), the worker pool
(``dist_pool``), a fake flash-attn package and ring-flash-attn 0.1.x's signatures."""
