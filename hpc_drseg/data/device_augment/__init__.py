"""The paper's training augmentation on the training device, in batches, with plain torch (`data.augment.where:
device`): the decoded training set lives on the device (store), each batch's random parameters are drawn there from
a generator seeded by (seed, epoch, rank, batch) (params), the geometric transforms become one sampling grid applied
with one grid_sample (geometry), colour, noise and blur are batched tensor ops (photometric), and batches (batches)
yields the trainer's Batches. docs/input-path.md says how each parameter matches data/augment.py.
"""
