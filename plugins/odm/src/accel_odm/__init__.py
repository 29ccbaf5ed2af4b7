"""accel-odm: online data mixing. An EXP3 bandit over the datasets of a data config picks
where the next examples come from, rewarded by each dataset's loss in the training forward
(or on its validation split).

* :mod:`.bandit` -- :class:`Exp3`
* :mod:`.sampler` -- :class:`OdmBatchSampler` (draws, per-dataset streams, resume state)
* :mod:`.rewards` -- :func:`per_example_loss` (per row, or per packed segment)
* :mod:`.plugin` -- :class:`OdmPlugin`, :class:`OdmConfig`
"""
