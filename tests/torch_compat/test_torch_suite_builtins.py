"""Torch's tests of the built-in parametrizations, ported (``test/nn/test_parametrization.py``).

The import is switched to ``torch_compat``; the rest follows torch's tests
(``TestCase``, ``assertRaisesRegex``, ``assertEqual``), restricted to one CPU
device (no DataParallel, no TorchScript). Set ``TORCH_COMPAT_REFERENCE=torch``
to run the same tests against torch itself.
"""

import os
import pickle
import unittest
from copy import deepcopy
from itertools import product

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import torch_compat.parametrizations as parametrizations
import torch_compat.parametrize as parametrize

if os.environ.get("TORCH_COMPAT_REFERENCE") == "torch":  # validate the port against torch
    import torch.nn.utils.parametrizations as parametrizations  # noqa: F811
    import torch.nn.utils.parametrize as parametrize  # noqa: F811


class TestNNParametrizationBuiltins(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)

    def assertEqual(self, a, b, msg=None):  # noqa: N802 - torch's TestCase API
        if isinstance(a, Tensor) or isinstance(b, Tensor):
            # torch's TestCase loosens its tolerance for bfloat16 (torch itself needs it here)
            tol = {"atol": 1e-2, "rtol": 1.6e-2} if torch.bfloat16 in (a.dtype, b.dtype) else {}
            torch.testing.assert_close(a, b, msg=msg, **tol)
        else:
            super().assertEqual(a, b, msg)

    def test_new_spectral_norm(self):
        input = torch.randn(3, 5, dtype=torch.double)
        m = nn.Linear(5, 7, dtype=torch.double)
        m = parametrizations.spectral_norm(m)
        spectral_norm_m = m.parametrizations.weight[0]

        self.assertEqual(spectral_norm_m._u.size(), torch.Size([m.weight.size(0)]))

        # .parametrizations.weight.original should be trainable
        self.assertTrue(hasattr(m.parametrizations.weight, "original"))
        self.assertTrue("original" in m.parametrizations.weight._parameters)

        # u should be just a reused buffer
        self.assertTrue(hasattr(spectral_norm_m, "_u"))
        self.assertTrue("_u" in spectral_norm_m._buffers)
        self.assertTrue("_v" in spectral_norm_m._buffers)

        # weight should be a plain attribute, not counted as a buffer or a param
        self.assertIsNotNone(m.weight)
        self.assertFalse("weight" in m._buffers)
        self.assertFalse("weight" in m._parameters)

        self.assertEqual(m.parametrizations.weight.original.size(), m.weight.size())
        self.assertEqual(m.parametrizations.weight.original.stride(), m.weight.stride())

        m = parametrize.remove_parametrizations(m, "weight")

        # spectral_norm is the only parametrization
        self.assertFalse(hasattr(m, "parametrizations"))
        self.assertTrue("weight" in m._parameters)

        # We can register spectral_norm multiple times on the same parameter
        # and on multiple parameters in the same module
        m = parametrizations.spectral_norm(m, "weight")
        m = parametrizations.spectral_norm(m, "weight")
        m = parametrizations.spectral_norm(m, "bias")

        # If we remove the parametrization on bias, weight is still parametrized
        # Removing a parametrization runs forward in eval mode if leave_parametrized=True
        m = parametrize.remove_parametrizations(m, "bias")
        self.assertTrue("bias" in m._parameters)
        self.assertTrue(hasattr(m, "parametrizations"))
        self.assertFalse("weight" in m._parameters)

        m = parametrize.remove_parametrizations(m, "weight")
        # Neither weight and bias are parametrized
        self.assertFalse(hasattr(m, "parametrizations"))
        self.assertTrue("weight" in m._parameters)
        self.assertFalse(parametrize.is_parametrized(m))

        # test correctness in training/eval modes (single device)
        for requires_grad in (True, False):
            m = nn.Linear(3, 4, dtype=torch.double)
            m.weight.requires_grad_(requires_grad)
            m = parametrizations.spectral_norm(m)
            wrapped_m = m
            spectral_norm_m = m.parametrizations.weight[0]

            self.assertTrue(hasattr(m, "parametrizations"))
            self.assertTrue("weight" not in m._parameters)

            # Test backward reaches the original weight and the buffers change in place
            input = torch.randn(2, 3, dtype=torch.double)
            m.train()
            u0 = spectral_norm_m._u.clone()
            v0 = spectral_norm_m._v.clone()
            u_obj, v_obj = spectral_norm_m._u, spectral_norm_m._v

            out = wrapped_m(input)
            if requires_grad:
                out.sum().backward()
                self.assertIsNotNone(m.parametrizations.weight.original.grad)
            self.assertIs(spectral_norm_m._u, u_obj)
            self.assertIs(spectral_norm_m._v, v_obj)
            self.assertEqual(spectral_norm_m._u.shape, u0.shape)
            self.assertEqual(spectral_norm_m._v.shape, v0.shape)

            # test removing: the value is kept
            pre_remove_out = wrapped_m(input)
            m.eval()
            pre_remove_out = wrapped_m(input)
            m = parametrize.remove_parametrizations(m, "weight")
            self.assertEqual(wrapped_m(input), pre_remove_out)

            m = parametrizations.spectral_norm(m)
            for _ in range(3):
                pre_remove_out = wrapped_m(input)
            m.eval()
            m = parametrize.remove_parametrizations(m, "weight")
            self.assertEqual(wrapped_m(input), pre_remove_out)

            # TEST EVAL BEHAVIOR
            m = parametrizations.spectral_norm(m)
            wrapped_m(input)
            last_train_out = wrapped_m(input)
            last_train_u = m.parametrizations.weight[0]._u.clone()
            last_train_v = m.parametrizations.weight[0]._v.clone()
            wrapped_m.zero_grad()
            wrapped_m.eval()

            eval_out0 = wrapped_m(input)
            # assert eval gives same result as last training iteration
            self.assertEqual(eval_out0, last_train_out)
            # assert doing more iteration in eval don't change things
            self.assertEqual(eval_out0, wrapped_m(input))
            self.assertEqual(last_train_u, m.parametrizations.weight[0]._u)
            self.assertEqual(last_train_v, m.parametrizations.weight[0]._v)

            # FIXME: the code below is flaky when executed with DataParallel
            # see https://github.com/pytorch/pytorch/issues/13818
            # test backward works with multiple forwards in mixed training
            # and eval modes; it uses training mode so we need to reset `u`
            # and `v` vectors to same value at beginning for finite
            # difference test to pass
            saved_u = m.parametrizations.weight[0]._u.clone()
            saved_v = m.parametrizations.weight[0]._v.clone()

            def fn(input, m=m, wrapped_m=wrapped_m, saved_u=saved_u, saved_v=saved_v):
                m.parametrizations.weight[0]._u.data.copy_(saved_u)
                m.parametrizations.weight[0]._v.data.copy_(saved_v)
                out0 = wrapped_m(input)
                out1 = wrapped_m(input)
                return out0 + out1

            # Make sure we can compute gradients wrt to all the parameters in the case
            # of double forward
            fn(input.clone().requires_grad_()).sum().backward()
            torch.autograd.gradcheck(
                fn, (input.clone().requires_grad_(),), check_batched_grad=False
            )

    def test_new_spectral_norm_load_state_dict(self):
        for activate_times in (0, 3):
            inp = torch.randn(2, 3)
            m = nn.Linear(3, 5)
            snm = parametrizations.spectral_norm(m)
            snm.train()

            for _ in range(activate_times):
                snm(inp)

            state_dict = deepcopy(snm.state_dict())
            self.assertEqual(
                {
                    "parametrizations.weight.original",
                    "bias",
                    "parametrizations.weight.0._v",
                    "parametrizations.weight.0._u",
                },
                set(state_dict.keys()),
            )

            # test that non-strict loading works
            non_strict_state_dict = deepcopy(state_dict)
            non_strict_state_dict["nonsense"] = "nonsense"
            with self.assertRaisesRegex(
                RuntimeError, r'Unexpected key\(s\) in state_dict: "nonsense"'
            ):
                snm.load_state_dict(non_strict_state_dict, strict=True)
            snm.load_state_dict(non_strict_state_dict, strict=False)
            del non_strict_state_dict["parametrizations.weight.original"]
            snm.load_state_dict(non_strict_state_dict, strict=False)
            del non_strict_state_dict["parametrizations.weight.0._u"]
            snm.load_state_dict(non_strict_state_dict, strict=False)
            del non_strict_state_dict["parametrizations.weight.0._v"]
            snm.load_state_dict(non_strict_state_dict, strict=False)
            non_strict_state_dict["weight"] = snm.weight.detach().clone()  # set W as a buffer
            snm.load_state_dict(non_strict_state_dict, strict=False)
            del non_strict_state_dict._metadata["parametrizations.weight.0"]  # remove metadata info
            snm.load_state_dict(non_strict_state_dict, strict=False)
            del non_strict_state_dict["weight"]  # remove W buffer
            snm.load_state_dict(non_strict_state_dict, strict=False)
            del non_strict_state_dict["bias"]
            snm.load_state_dict(non_strict_state_dict, strict=False)

            # normal state_dict

            # test that re-wrapping does not matter
            m = parametrize.remove_parametrizations(snm, "weight")
            snm = parametrizations.spectral_norm(m)

            snm.load_state_dict(state_dict)
            with torch.no_grad():
                snm.eval()
                out0_eval = snm(inp)
                snm.train()
                out1_train = snm(inp)
                out2_train = snm(inp)
                snm.eval()
                out3_eval = snm(inp)

            # test that re-wrapping does not matter
            m = parametrize.remove_parametrizations(snm, "weight")
            snm = parametrizations.spectral_norm(m)

            # Test normal loading
            snm.load_state_dict(state_dict)
            with torch.no_grad():
                snm.eval()
                self.assertEqual(out0_eval, snm(inp))
                snm.train()
                self.assertEqual(out1_train, snm(inp))
                self.assertEqual(out2_train, snm(inp))
                snm.eval()
                self.assertEqual(out3_eval, snm(inp))

    def test_new_spectral_norm_dim(self):
        inp = torch.randn(2, 3, 10, 12)
        m = nn.ConvTranspose2d(3, 4, (5, 6))
        m = parametrizations.spectral_norm(m)
        snm = m.parametrizations.weight[0]
        # this should not run into incompatible shapes
        m(inp)
        # check that u refers to the same dimension
        self.assertEqual(snm._u.shape, m.parametrizations.weight.original[0, :, 0, 0].shape)

    def test_new_spectral_norm_forward(self):
        input = torch.randn(3, 5)
        m = nn.Linear(5, 7)
        m = parametrizations.spectral_norm(m)
        snm = m.parametrizations.weight[0]
        # naive forward
        _weight = m.parametrizations.weight.original
        _bias, _v = m.bias, snm._v
        _weight_mat = _weight.view(_weight.size(0), -1)
        _u = torch.mv(_weight_mat, _v)
        _u = F.normalize(_u, dim=0, eps=1e-12)
        _v = torch.mv(_weight_mat.t(), _u)
        _v = F.normalize(_v, dim=0, eps=1e-12)
        _weight.data /= torch.dot(_u, torch.matmul(_weight_mat, _v))
        out_hat = torch.nn.functional.linear(input, _weight, _bias)
        expect_out = m(input)
        self.assertEqual(expect_out, out_hat)

    def test_new_spectral_norm_value(self):
        # a test that the spectral norm (= top singular value)
        # is in fact properly calculated, using example of a simple diagonal matrix.
        for dtype in (torch.float, torch.cfloat):
            m = nn.Linear(2, 2, dtype=dtype)
            with torch.no_grad():
                # set weight to be diagonal
                x = torch.diagonal(m.weight)
                m.weight = nn.Parameter(torch.diag(x))
                parametrizations.spectral_norm(m)
                # weights should be rescaled by spectral norm, (i.e., largest diagonal
                # element in norm)
                expected = torch.diag(x / x.abs().max())
                self.assertEqual(m.weight.data, expected)

    def test_orthogonal_parametrization(self):
        # A fast subset (tall Linear, real and complex); the full product is below.
        self._check_orthogonal_parametrization(((5, 3),), (True,))

    @pytest.mark.slow
    def test_orthogonal_parametrization_full(self):
        self._check_orthogonal_parametrization(((4, 4), (5, 3), (3, 5)), (True, False))

    def _check_orthogonal_parametrization(self, shapes, linear_choices):
        # Orthogonal implements 6 algorithms (3x parametrizations times 2 options of
        # use_trivialization). We test them all

        def assert_is_orthogonal(X):
            n, k = X.size(-2), X.size(-1)
            if n < k:
                X = X.mT
                n, k = k, n
            Id = torch.eye(k, dtype=X.dtype, device=X.device).expand(*(X.size()[:-2]), k, k)
            eps = 10 * n * torch.finfo(X.dtype).eps
            torch.testing.assert_close(X.mH @ X, Id, atol=eps, rtol=0.0)

        def assert_weight_allclose_Q(weight, W):
            # Test that weight is equal to the Q part of the QR decomposition of W
            # (or of its transpose if the matrix is wide)
            wide_matrix = W.size(-2) < W.size(-1)
            if wide_matrix:
                W = W.mT
            Q, R = torch.linalg.qr(W)
            Q *= R.diagonal(dim1=-2, dim2=-1).sgn().unsqueeze(-2)
            if wide_matrix:
                Q = Q.mT
            torch.testing.assert_close(Q, weight, atol=1e-5, rtol=0.0)

        for shape, dtype, use_linear in product(
            shapes,  # square/ tall / wide
            (torch.float32, torch.complex64),
            linear_choices,
        ):
            # Conv2d does not support complex yet
            if not use_linear and dtype.is_complex:
                continue

            if use_linear:
                input = torch.randn(3, shape[0], dtype=dtype)
            else:
                input = torch.randn(2, 2, shape[0] + 2, shape[1] + 1, dtype=dtype)

            for parametrization, use_trivialization in product(
                ("matrix_exp", "cayley", "householder"), (False, True)
            ):
                # right_inverse for Cayley and matrix_exp not implemented for
                # use_trivialization=False
                # See Note [right_inverse expm cayley]
                can_initialize = use_trivialization or parametrization == "householder"

                # We generate them every time to always start with fresh weights
                if use_linear:
                    m = nn.Linear(*shape, dtype=dtype)
                else:
                    m = nn.Conv2d(2, 3, shape, dtype=dtype)

                # We do not support householder for complex inputs
                # See Note [Householder complex]
                w_init = m.weight.clone()
                if parametrization == "householder" and m.weight.is_complex():
                    msg = "householder parametrization does not support complex tensors"
                    with self.assertRaisesRegex(ValueError, msg):
                        parametrizations.orthogonal(
                            m, "weight", parametrization, use_trivialization=use_trivialization
                        )
                    continue

                wide_matrix = w_init.size(-2) < w_init.size(-1)
                parametrizations.orthogonal(
                    m, "weight", parametrization, use_trivialization=use_trivialization
                )
                # Forwards works as expected
                self.assertEqual(w_init.shape, m.weight.shape)
                assert_is_orthogonal(m.weight)
                if can_initialize:
                    assert_weight_allclose_Q(m.weight, w_init)

                # Initializing with a given orthogonal matrix works
                X = torch.randn_like(m.weight)
                if wide_matrix:
                    X = X.mT
                w_new = torch.linalg.qr(X).Q
                if wide_matrix:
                    w_new = w_new.mT
                if can_initialize:
                    m.weight = w_new
                    torch.testing.assert_close(w_new, m.weight, atol=1e-5, rtol=0.0)
                else:
                    msg = "assign to the matrix exponential or the Cayley parametrization"
                    with self.assertRaisesRegex(NotImplementedError, msg):
                        m.weight = w_new

                # Initializing with a non-orthogonal matrix makes m.weight be the Q part of the
                # given matrix
                w_new = torch.randn_like(m.weight)
                if can_initialize:
                    m.weight = w_new
                    assert_weight_allclose_Q(m.weight, w_new)
                else:
                    msg = "assign to the matrix exponential or the Cayley parametrization"
                    with self.assertRaisesRegex(NotImplementedError, msg):
                        m.weight = w_new

                opt = torch.optim.SGD(m.parameters(), lr=0.1)
                for _ in range(2):
                    opt.zero_grad()
                    m(input).norm().backward()
                    grad = m.parametrizations.weight.original.grad
                    self.assertIsNotNone(grad)
                    # We do not update the upper triangular part of the matrix if tall tril if wide
                    if grad.size(-2) >= grad.size(-1):
                        zeros_grad = grad.triu(1)
                    else:
                        zeros_grad = grad.tril(-1)
                    self.assertEqual(zeros_grad, torch.zeros_like(zeros_grad))
                    # The gradient in the diagonal can only be imaginary because a skew-Hermitian
                    # matrix has imaginary diagonal
                    diag_grad = grad.diagonal(dim1=-2, dim2=-1)
                    if grad.is_complex():
                        diag_grad = diag_grad.real
                    self.assertEqual(diag_grad, torch.zeros_like(diag_grad))
                    opt.step()
                    assert_is_orthogonal(m.weight)

    def test_orthogonal_errors(self):
        m = nn.Linear(3, 4)
        with self.assertRaisesRegex(ValueError, "has to be one of"):
            parametrizations.orthogonal(m, "weight", "foo")

        with self.assertRaisesRegex(ValueError, "Expected a matrix"):
            parametrizations.orthogonal(m, "bias")

        parametrizations.orthogonal(m, "weight")
        with self.assertRaisesRegex(ValueError, "matrices of shape"):
            m.weight = torch.randn(5, 5)
        parametrize.remove_parametrizations(m, "weight")

    def test_weight_norm_state_dict_compat(self):
        m = nn.Linear(4, 5)
        m = torch.nn.utils.weight_norm(m)
        old_dict = m.state_dict()

        m2 = nn.Linear(4, 5)
        m2 = parametrizations.weight_norm(m2)
        m2.load_state_dict(old_dict)

        input = torch.randn(3, 4)
        self.assertEqual(m(input), m2(input))

    def test_weight_norm_pickle(self):
        m = nn.Linear(4, 5)
        m = parametrizations.weight_norm(m)
        with self.assertRaisesRegex(RuntimeError, "state_dict"):
            pickle.dumps(m)

    def test_weight_norm_deepcopy(self):
        m = nn.Linear(4, 5)
        m = parametrizations.weight_norm(m)
        m2 = deepcopy(m)
        input = torch.randn(3, 4)
        self.assertEqual(m(input), m2(input))

    def test_weight_norm_parametrization(self):
        for dtype in [torch.float, torch.bfloat16]:
            input = torch.randn(3, 4, dtype=dtype)
            m = nn.Linear(4, 5, dtype=dtype)
            expected_output = m(input)

            # add weight normalization
            m = parametrizations.weight_norm(m)
            self.assertEqual(m.parametrizations.weight.original1.size(), m.weight.size())
            self.assertEqual(m.parametrizations.weight.original0.size(), (5, 1))
            self.assertEqual(m(input), expected_output)

            # remove weight norm
            parametrize.remove_parametrizations(m, "weight")
            self.assertFalse(hasattr(m, "parametrizations"))
            self.assertEqual(m(input), expected_output)

            # test with dim=1
            m = parametrizations.weight_norm(m, dim=1)
            self.assertEqual(m.parametrizations.weight.original1.size(), m.weight.size())
            self.assertEqual(m.parametrizations.weight.original0.size(), (1, 4))
            self.assertEqual(m(input), expected_output)

            # test with dim=None
            m = nn.Linear(4, 5, dtype=dtype)
            expected_output = m(input)
            m = parametrizations.weight_norm(m, dim=None)
            self.assertEqual(m(input), expected_output)


if __name__ == "__main__":
    unittest.main()
