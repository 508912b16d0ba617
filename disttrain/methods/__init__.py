"""Each paper's objectives, synthesis and scoring as plain functions and small modules (single device).

    outlier_exposure   OE, Energy-OE, MixupOE (mixupoe.txt Section 4): `build_objective(name, ...)`
"""
