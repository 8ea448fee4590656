"""Ops built from other kernels, written once for every backend that lacks a kernel of its own."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def conv2d_over_apply_mask(apply_mask: Callable) -> Callable:
    """``masked_conv2d`` as one fused ``W * M`` pass (``apply_mask``), then the platform's convolution
    (oneDNN on CPU, cuDNN on CUDA). A convolution reuses its weight over every output pixel, so the
    extra weight write and read are small next to the activations, and the platform brings tuned
    algorithms for every stride / padding / dilation / group combination."""

    def masked_conv2d(x, weight, mask_words, bias, stride, padding, dilation, groups):
        return F.conv2d(x, apply_mask(weight, mask_words), bias, stride, padding, dilation, groups)

    return masked_conv2d


def grouped_grad_input_by_task(grad_input: Callable) -> Callable:
    """``masked_linear_grouped_grad_input`` as one ``masked_linear_grad_input`` per task present:
    rows bucketed by task id."""

    def masked_linear_grouped_grad_input(grad_out, weight, bank, task_ids):
        gx = grad_out.new_zeros(grad_out.shape[0], weight.shape[1])
        for t in torch.unique(task_ids).tolist():
            rows = task_ids == t
            gx[rows] = grad_input(grad_out[rows], weight, bank[t])
        return gx

    return masked_linear_grouped_grad_input


def weight_grad_times_sign(weight_grad: Callable) -> Callable:
    """``masked_weight_grad_sign`` as the weight gradient times ``sign(S)`` (an extra pass)."""

    def masked_weight_grad_sign(grad_out, x, weight, scores):
        return weight_grad(grad_out, x, weight) * scores.sign().to(weight.dtype)

    return masked_weight_grad_sign
