"""A tiny stand-in for Inception in tests: importing this module registers it with torch-fidelity.

Used in-process by the tests and in CLI subprocesses through `imports=[randconv_extractor]`.
"""

from __future__ import annotations

import torch

TEST_EXTRACTOR = "test-randconv"


def _register_test_extractor() -> None:
    """A fixed random conv net as a stand-in for Inception on tiny images (same torch-fidelity interface)."""
    import torch_fidelity
    import torch_fidelity.registry as registry
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class RandConvFeatures(FeatureExtractorBase):
        def __init__(self, name: str, features_list: list[str], **kwargs: object) -> None:
            super().__init__(name, features_list)
            gen = torch.Generator().manual_seed(1234)
            self.w1 = torch.nn.Parameter(torch.randn(16, 3, 3, 3, generator=gen) * 0.3, requires_grad=False)
            self.w2 = torch.nn.Parameter(torch.randn(32, 16, 3, 3, generator=gen) * 0.2, requires_grad=False)

        @staticmethod
        def get_provided_features_list() -> tuple[str, ...]:
            return ("32",)

        @staticmethod
        def get_default_feature_layer_for_metric(metric: str) -> str:
            return "32"

        @staticmethod
        def can_be_compiled() -> bool:
            return False

        @staticmethod
        def get_dummy_input_for_compile() -> torch.Tensor:
            return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
            x = x.float() / 127.5 - 1
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            h = torch.tanh(torch.nn.functional.conv2d(x, self.w1, padding=1))
            h = torch.tanh(torch.nn.functional.conv2d(h, self.w2, padding=1))
            return (h.mean(dim=(2, 3)),)

    if TEST_EXTRACTOR not in registry.FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(TEST_EXTRACTOR, RandConvFeatures)


_register_test_extractor()
