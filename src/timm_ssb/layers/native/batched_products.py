"""The PyTorch path of the resampling on channels-last maps (the sampling backend ``'reference'``): batched matrix
products, forward and backward, over contiguous views."""

from typing import Optional

import torch

__all__ = ['BatchedProductsResample', 'x_product', 'y_product', 'x_matrix_gradient', 'y_matrix_gradient']


def y_product(matrix: torch.Tensor, rows: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(B, n, h) @ (B, h, k, C) -> (B, n, k, C)``: one matrix product per sample, over whole rows."""
    batch_size, height, k, channels = rows.shape
    n = matrix.shape[1]
    result = torch.bmm(matrix, rows.reshape(batch_size, height, k * channels), out=out)
    return result.view(batch_size, n, k, channels)


def x_product(matrix: torch.Tensor, rows: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(B, m, w)`` applied along the ``w`` axis of ``(B, r, w, C)`` -> ``(B, r, m, C)``: one product per row."""
    batch_size, r, width, channels = rows.shape
    m = matrix.shape[1]
    per_row = matrix.unsqueeze(1).expand(batch_size, r, m, width).reshape(batch_size * r, m, width)
    result = torch.bmm(per_row, rows.reshape(batch_size * r, width, channels), out=out)
    return result.view(batch_size, r, m, channels)


def y_matrix_gradient(grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The gradient of the matrix of a :func:`y_product` that gave ``(B, n, k, C)`` with gradient ``grad`` from
    ``rows (B, h, k, C)``: ``(B, n, h)``, the dot products of whole rows."""
    batch_size, n = grad.shape[:2]
    return torch.bmm(grad.reshape(batch_size, n, -1), rows.reshape(batch_size, rows.shape[1], -1).transpose(1, 2))


def x_matrix_gradient(grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The gradient of the matrix of an :func:`x_product` that gave ``(B, r, m, C)`` with gradient ``grad`` from
    ``rows (B, r, w, C)``: ``(B, m, w)``, summed over the rows."""
    batch_size, r, m, channels = grad.shape
    width = rows.shape[2]
    per_row = torch.bmm(
        grad.reshape(batch_size * r, m, channels), rows.reshape(batch_size * r, width, channels).transpose(1, 2)
    )
    return per_row.view(batch_size, r, m, width).sum(1)


class BatchedProductsResample(torch.autograd.Function):
    """``z = matrix_y @ x @ matrix_x^T``, optionally ``relu(residual + z)``, on a channels-last map, forward and
    backward as batched matrix products over contiguous ``(B, H, W, C)`` views: no layout copies of
    the map in either direction, and the gradient comes out channels-last like the input.

    The y-axis product is one large matrix product per sample; the x-axis one is many small ones, one per
    row. The large product is put on the full-resolution side, where it runs faster than many small ones: first
    when sampling down (``matrix_y`` reads the input), last when mapping back up (``matrix_y`` writes the output).

    With a residual (mapping a block's result back up), the last product is written straight into the
    output, the residual is added in place and so is the ReLU: one new full-resolution tensor instead of
    three, and it is a fresh tensor, not a view.

    The intermediate (after the first product) is needed only for the gradient of the matrix applied
    second (learned matrices). It is kept when it is not larger than the input (sampling down) and
    recomputed in backward otherwise (mapping back up, where it would be the largest tensor kept).
    """

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        matrix_y: torch.Tensor,
        matrix_x: torch.Tensor,
        residual: Optional[torch.Tensor],
        relu: bool,
    ) -> torch.Tensor:
        rows = x.permute(0, 2, 3, 1)  # (B, H, W, C), contiguous
        batch_size, height, width, channels = rows.shape
        out_h, out_w = matrix_y.shape[1], matrix_x.shape[1]
        x_first = out_h > height
        t = x_product(matrix_x, rows) if x_first else y_product(matrix_y, rows)
        out = torch.empty(
            (batch_size, channels, out_h, out_w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last
        )
        out_rows = out.permute(0, 2, 3, 1).view(batch_size * (1 if x_first else out_h), -1, channels)
        if x_first:
            y_product(matrix_y, t, out=out_rows.view(batch_size, out_h, out_w * channels))
        else:
            x_product(matrix_x, t, out=out_rows)
        if residual is not None:
            out_rows.add_(residual.permute(0, 2, 3, 1).reshape(out_rows.shape))
        if relu:
            out.relu_()
        second = matrix_y if x_first else matrix_x
        ctx.x_first = x_first
        ctx.relu = relu
        ctx.keep_t = t.numel() <= rows.numel() and second.requires_grad
        ctx.save_for_backward(rows, matrix_y, matrix_x, t if ctx.keep_t else None, out if relu else None)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        rows, matrix_y, matrix_x, t, out = ctx.saved_tensors
        if ctx.relu:
            grad_out = torch.ops.aten.threshold_backward(grad_out, out, 0)
        grad_residual = grad_out if ctx.needs_input_grad[3] else None
        grad_z = grad_out.to(rows.dtype).permute(0, 2, 3, 1).contiguous()  # (B, P, Q, C)
        matrix_y_t, matrix_x_t = matrix_y.transpose(1, 2), matrix_x.transpose(1, 2)
        if ctx.x_first:
            grad_t = y_product(matrix_y_t, grad_z)  # (B, H, Q, C)
        else:
            grad_t = x_product(matrix_x_t, grad_z)  # (B, P, W, C)
        grad_rows = grad_y = grad_x = None
        if ctx.needs_input_grad[0]:
            grad_rows = x_product(matrix_x_t, grad_t) if ctx.x_first else y_product(matrix_y_t, grad_t)
            grad_rows = grad_rows.permute(0, 3, 1, 2)
        if t is None and ctx.needs_input_grad[1 if ctx.x_first else 2]:
            t = x_product(matrix_x, rows) if ctx.x_first else y_product(matrix_y, rows)
        if ctx.needs_input_grad[1]:
            grad_y = y_matrix_gradient(*((grad_z, t) if ctx.x_first else (grad_t, rows)))
        if ctx.needs_input_grad[2]:
            grad_x = x_matrix_gradient(*((grad_t, rows) if ctx.x_first else (grad_z, t)))
        return grad_rows, grad_y, grad_x, grad_residual, None
