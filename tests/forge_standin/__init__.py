"""Stand-in test tier: FreeFuse's Forge layer against a small stand-in of Forge's backend (see conftest)."""
