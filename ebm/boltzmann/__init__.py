"""Boltzmann machines and structured prediction with discrete energies.

- :mod:`ebm.boltzmann.rbm`: the Bernoulli–Bernoulli restricted Boltzmann machine, whose free energy is an
  energy of the library's contract, and its exact partition function by enumeration.
- :mod:`ebm.boltzmann.gibbs`: the block Gibbs sampler (annealed, or its zero-temperature limit ICM) for any
  model that can redraw its variables block by block.
- :mod:`ebm.boltzmann.ais`: annealed importance sampling of an RBM's log partition function
  (Salakhutdinov & Murray 2008) and the test log-likelihood it gives.
- :mod:`ebm.boltzmann.training`: CD-k and PCD training through the library's contrastive-divergence loss
  and trainer.
- :mod:`ebm.boltzmann.structured`: an energy E(x, y) over an image and a binary label grid, trained by
  contrastive divergence and decoded by Gibbs sampling, annealing/ICM or Langevin on a relaxation.
"""
