"""What both families and the kernels share: masks (:mod:`.mask`), which tokens each rank holds
(:mod:`.layouts`), merging and accumulating partial results (:mod:`.merge`, :mod:`.accumulate`),
communication (:mod:`.comm`), input checks (:mod:`.validation`) and the autograd boundary
(:mod:`.function`). Imports nothing at package level."""
