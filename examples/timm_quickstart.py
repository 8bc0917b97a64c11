"""Any timm model, masked and trained with the ToST recipe: ``python examples/timm_quickstart.py [MODEL]``."""

import sys

import timm
import torch
import torch.nn.functional as F

import tost_surgery as tost

model = timm.create_model(sys.argv[1] if len(sys.argv) > 1 else "resnet18", pretrained=False, num_classes=10)
model = tost.prepare(model, tost.masks.erk(model, sparsity=0.9, seed=0), tost.Recipe.tost(total_steps=20))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
tost.bind(model, optimizer)  # every optimizer.step() advances the recipe's schedule
for _ in range(20):  # random images stand in for your DataLoader
    x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,))
    loss = F.cross_entropy(model(x), y, label_smoothing=tost.label_smoothing(model))  # the recipe's
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
print(tost.report(tost.finalize(model)), f"last loss {loss.item():.4f}")  # a plain sparse timm model again
