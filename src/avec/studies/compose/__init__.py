"""Do two (or more) steering vectors act independently? Score grids over their coefficients on
a language model (:mod:`.language`) and on the maze policy (:mod:`.maze`), analysed by
:mod:`avec.evaluate.compose`."""
