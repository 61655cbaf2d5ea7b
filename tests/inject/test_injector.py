"""The injector's own contract (DESIGN.md, contract points 1-3) and the extensions
``ExtendedInjector`` adds to ``dependencies.Injector`` 2.0.1.

Most tests use tiny plain classes so that a failure points at the injector, not at a core module;
a few use real ``quantwire.core`` modules to show the declarations quantizers are made of work.
"""

from __future__ import annotations

import concurrent.futures
import copy
import keyword
import pickle
import re
import sys
import threading
import types

import dependencies
import pytest
import torch
from dependencies.exceptions import DependencyError as LibraryDependencyError
from hypothesis import given
from hypothesis import strategies as st

from quantwire.core.quant import BinaryQuant
from quantwire.core.scaling import ParameterScaling
from quantwire.errors import QuantwireError
from quantwire.inject import DependencyError, ExtendedInjector, this, value

InjectorMeta = type(ExtendedInjector)


# --------------------------------------------------------------------------------------------
# Tiny plain classes the quantizers below wire together.
# --------------------------------------------------------------------------------------------


class Scale:
    def __init__(self, scaling_init, scaling_min_val=1e-10):
        self.scaling_init = scaling_init
        self.scaling_min_val = scaling_min_val


class ChannelScale:
    def __init__(self, scaling_init, channels):
        self.scaling_init = scaling_init
        self.channels = channels


class Quant:
    def __init__(self, scaling_impl, bit_width=8, signed=True):
        self.scaling_impl = scaling_impl
        self.bit_width = bit_width
        self.signed = signed


class Ternary:
    def __init__(self, scaling_impl, threshold=0.5):
        self.scaling_impl = scaling_impl
        self.threshold = threshold


class NoInit:
    pass


class Leaf:
    def __init__(self, a):
        self.a = a


class Holder:
    def __init__(self, leaf, extra=None):
        self.leaf = leaf
        self.extra = extra


class Pair:
    def __init__(self, left, right):
        self.left = left
        self.right = right


class Needs:
    def __init__(self, shared):
        self.shared = shared


class VarArgs:
    def __init__(self, a, *args, scale=1.0, **kwargs):
        self.a = a
        self.args = args
        self.scale = scale
        self.kwargs = kwargs


class OnlyVarArgs:
    def __init__(self, *args, **kwargs):
        self.args = args
        self.kwargs = kwargs


# --------------------------------------------------------------------------------------------
# Module-level quantizers (pickled by reference).
# --------------------------------------------------------------------------------------------


class PickleQuant(ExtendedInjector):
    tensor_quant = Quant
    scaling_impl = Scale
    scaling_init = 1.0
    bit_width = 4


class PickleValueQuant(ExtendedInjector):
    tensor_quant = Quant
    scaling_init = 1.0
    per_channel = False
    channels = 3

    @value
    def scaling_impl(per_channel):
        return ChannelScale if per_channel else Scale


class TorchBinaryQuant(ExtendedInjector):
    tensor_quant = BinaryQuant
    scaling_impl = ParameterScaling
    scaling_init = 0.5


# ============================================================================================
# 1. Attributes that are classes are built, with their arguments wired by name.
# ============================================================================================


class TestAutoWiring:
    def test_class_attribute_is_a_new_instance_on_every_read(self):
        class Q(ExtendedInjector):
            tensor_quant = Quant
            scaling_impl = Scale
            scaling_init = 1.0

        first, second = Q.tensor_quant, Q.tensor_quant
        assert isinstance(first, Quant) and isinstance(second, Quant)
        assert first is not second
        # Recursively new: the wired dependency is rebuilt too.
        assert first.scaling_impl is not second.scaling_impl
        assert Q.scaling_impl is not Q.scaling_impl

    def test_constructor_arguments_are_filled_by_name_recursively(self):
        class Q(ExtendedInjector):
            tensor_quant = Quant
            scaling_impl = Scale
            scaling_init = 0.25
            bit_width = 3
            signed = False

        quant = Q.tensor_quant
        assert isinstance(quant.scaling_impl, Scale)
        assert quant.scaling_impl.scaling_init == 0.25
        assert quant.bit_width == 3
        assert quant.signed is False

    def test_constructor_defaults_are_used_when_the_injector_lacks_the_attribute(self):
        class Q(ExtendedInjector):
            tensor_quant = Quant
            scaling_impl = Scale
            scaling_init = 1.0

        quant = Q.tensor_quant
        assert quant.bit_width == 8
        assert quant.signed is True
        assert quant.scaling_impl.scaling_min_val == 1e-10

    def test_an_attribute_overrides_a_constructor_default_even_with_a_falsy_value(self):
        class Q(ExtendedInjector):
            holder = Holder
            leaf = Leaf
            a = 0
            extra = None

        holder = Q.holder
        assert holder.leaf.a == 0
        assert holder.extra is None

        class R(Q):
            extra = ""

        assert R.holder.extra == ""

    def test_plain_attributes_are_returned_as_they_are(self):
        table = {"k": [1, 2]}

        class Q(ExtendedInjector):
            x = table
            y = 3.5

        assert Q.x is table
        assert Q.y == 3.5

    def test_class_named_with_class_suffix_is_returned_unbuilt(self):
        class Q(ExtendedInjector):
            impl_class = Scale

        assert Q.impl_class is Scale

    def test_class_without_init_is_built(self):
        class Q(ExtendedInjector):
            thing = NoInit

        assert isinstance(Q.thing, NoInit)
        assert Q.thing is not Q.thing

    def test_one_read_builds_each_shared_dependency_once(self):
        # As in the library: within one lookup, an attribute used twice is built once.
        class Q(ExtendedInjector):
            pair = Pair
            left = Needs
            right = Needs
            shared = NoInit

        pair = Q.pair
        assert pair.left.shared is pair.right.shared
        assert Q.pair.left.shared is not pair.left.shared

    def test_missing_attribute_message_is_exact(self):
        class MyQuant(ExtendedInjector):
            tensor_quant = Quant
            scaling_impl = Scale

        with pytest.raises(DependencyError) as excinfo:
            _ = MyQuant.scaling_init
        assert str(excinfo.value) == "'MyQuant' can not resolve attribute 'scaling_init'"

    def test_missing_required_argument_names_the_attribute_being_built(self):
        class MyQuant(ExtendedInjector):
            tensor_quant = Quant
            scaling_impl = Scale

        with pytest.raises(DependencyError) as excinfo:
            _ = MyQuant.scaling_impl
        assert str(excinfo.value) == (
            "'MyQuant' can not resolve attribute 'scaling_init' while building 'scaling_impl'"
        )

        # Two levels deep: the suffix names the attribute whose constructor needs it.
        with pytest.raises(DependencyError) as excinfo:
            _ = MyQuant.tensor_quant
        message = str(excinfo.value)
        assert message.startswith("'MyQuant' can not resolve attribute 'scaling_init' while building 'scaling_impl'")
        assert "while building 'tensor_quant'" not in message

    def test_missing_argument_error_with_real_core_modules(self):
        class MyQuant(ExtendedInjector):
            tensor_quant = BinaryQuant
            scaling_impl = ParameterScaling

        with pytest.raises(DependencyError, match=r"^'MyQuant' can not resolve attribute 'scaling_init'"):
            _ = MyQuant.tensor_quant

    def test_real_core_modules_are_wired(self):
        first, second = TorchBinaryQuant.tensor_quant, TorchBinaryQuant.tensor_quant
        assert isinstance(first, BinaryQuant)
        assert first is not second
        assert first.scaling_impl.value is not second.scaling_impl.value
        y, scale, zero_point, bit_width = first(torch.tensor([-2.0, 3.0]))
        assert torch.equal(y.detach(), torch.tensor([-0.5, 0.5]))
        assert scale.item() == 0.5
        assert zero_point.item() == 0.0
        assert bit_width.item() == 1.0

    @given(
        a=st.one_of(st.integers(), st.text(), st.floats(allow_nan=False), st.none(), st.booleans()),
        extra=st.one_of(st.integers(), st.tuples(st.integers(), st.text())),
    )
    def test_attribute_values_reach_the_constructor_unchanged(self, a, extra):
        Q = InjectorMeta(
            "Q",
            (ExtendedInjector,),
            {
                "__module__": __name__,
                "__qualname__": "Q",
                "holder": Holder,
                "leaf": Leaf,
                "a": a,
                "extra": extra,
            },
        )
        holder = Q.holder
        assert holder.leaf.a is a
        assert holder.extra is extra

    @given(
        class_name=st.from_regex(r"[A-Z][A-Za-z0-9]{0,10}", fullmatch=True),
        attr=st.from_regex(r"[a-z][a-z0-9_]{0,12}", fullmatch=True).filter(
            lambda name: name not in ("let", "follow") and not keyword.iskeyword(name)
        ),
    )
    def test_missing_attribute_messages_name_injector_and_attribute(self, class_name, attr):
        Q = InjectorMeta(class_name, (ExtendedInjector,), {"__module__": __name__, "follow": getattr(this, attr)})
        with pytest.raises(DependencyError) as excinfo:
            getattr(Q, attr)
        assert str(excinfo.value) == f"{class_name!r} can not resolve attribute {attr!r}"
        with pytest.raises(DependencyError) as excinfo:
            _ = Q.follow
        assert str(excinfo.value) == (f"{class_name!r} can not resolve attribute {attr!r} while building 'follow'")


# ============================================================================================
# 2. @value functions.
# ============================================================================================


class TestValue:
    def test_value_is_evaluated_at_injection_time_with_resolved_arguments(self):
        calls = []

        class Q(ExtendedInjector):
            a = 2
            leaf = Leaf

            @value
            def x(a, leaf):
                calls.append((a, leaf))
                return a * 10

        assert calls == []  # declaring the quantizer does not evaluate it
        assert Q.x == 20
        assert len(calls) == 1
        assert calls[0][0] == 2 and isinstance(calls[0][1], Leaf)
        assert Q.x == 20
        assert len(calls) == 2  # evaluated again on every read
        assert calls[0][1] is not calls[1][1]

    def test_value_sees_overrides(self):
        class Q(ExtendedInjector):
            a = 2

            @value
            def x(a):
                return a + 1

        assert Q.let(a=41).x == 42
        assert Q.x == 3

    def test_value_returning_a_class_is_auto_wired(self):
        class Q(ExtendedInjector):
            tensor_quant = Quant
            scaling_init = 2.0
            per_channel = False
            channels = 4

            @value
            def scaling_impl(per_channel):
                return ChannelScale if per_channel else Scale

        impl = Q.scaling_impl
        assert type(impl) is Scale and impl.scaling_init == 2.0
        assert Q.scaling_impl is not impl

        quant = Q.let(per_channel=True).tensor_quant
        assert type(quant.scaling_impl) is ChannelScale
        assert quant.scaling_impl.channels == 4
        assert quant.scaling_impl.scaling_init == 2.0
        # The original still picks the other branch.
        assert type(Q.tensor_quant.scaling_impl) is Scale

    def test_value_returning_a_class_whose_argument_is_missing(self):
        class MyQuant(ExtendedInjector):
            @value
            def scaling_impl():
                return Scale

        with pytest.raises(DependencyError) as excinfo:
            _ = MyQuant.scaling_impl
        assert str(excinfo.value).startswith(
            "'MyQuant' can not resolve attribute 'scaling_init' while building 'scaling_impl'"
        )

    def test_value_returning_a_class_for_a_class_suffix_name_is_not_built(self):
        class Q(ExtendedInjector):
            @value
            def impl_class():
                return Scale

        assert Q.impl_class is Scale

    def test_value_returning_an_instance_returns_it_as_is(self):
        marker = Scale(3.0)

        class Q(ExtendedInjector):
            @value
            def x():
                return marker

        assert Q.x is marker

    def test_value_returning_this_follows_the_attribute(self):
        class Q(ExtendedInjector):
            scaling_init = 1.5
            kind = "int"
            int_quant = Quant
            ternary_quant = Ternary
            scaling_impl = Scale

            @value
            def tensor_quant(kind):
                return this.int_quant if kind == "int" else this.ternary_quant

        assert type(Q.tensor_quant) is Quant
        assert Q.tensor_quant is not Q.tensor_quant
        assert Q.tensor_quant.scaling_impl.scaling_init == 1.5
        assert type(Q.let(kind="ternary").tensor_quant) is Ternary

    def test_value_returning_this_to_a_plain_value(self):
        class Q(ExtendedInjector):
            other = 7

            @value
            def x():
                return this.other

        assert Q.x == 7

    def test_this_is_lazy_when_the_branch_is_not_taken(self):
        class MyQuant(ExtendedInjector):
            use_missing = False

            @value
            def x(use_missing):
                return this.missing if use_missing else 1

        assert MyQuant.x == 1
        with pytest.raises(DependencyError) as excinfo:
            _ = MyQuant.let(use_missing=True).x
        assert str(excinfo.value) == "'MyQuant' can not resolve attribute 'missing' while building 'x'"

    def test_declared_this_to_a_missing_attribute_only_fails_when_read(self):
        class MyQuant(ExtendedInjector):
            x = this.missing
            y = 1

        assert MyQuant.y == 1
        with pytest.raises(DependencyError, match="can not resolve attribute 'missing'"):
            _ = MyQuant.x

    def test_this_chains(self):
        class Q(ExtendedInjector):
            holder = Holder
            leaf = Leaf
            a = "deep"
            table = {"k": {"j": 5}}
            declared = this.holder.leaf.a
            item = this.table["k"]["j"]

            @value
            def produced():
                return this.holder.leaf.a

        assert Q.declared == "deep"
        assert Q.item == 5
        assert Q.produced == "deep"

    def test_value_chain_through_this_and_classes(self):
        class Q(ExtendedInjector):
            scaling_init = 0.125
            per_channel = True
            channels = 2
            tensor_quant = Quant

            @value
            def scaling_impl():
                return this.chosen_scaling

            @value
            def chosen_scaling(per_channel):
                return ChannelScale if per_channel else Scale

        quant = Q.tensor_quant
        assert type(quant.scaling_impl) is ChannelScale
        assert quant.scaling_impl.channels == 2
        assert quant.scaling_impl.scaling_init == 0.125

    def test_value_default_arguments(self):
        class Q(ExtendedInjector):
            a = 1

            @value
            def x(a, b=5, c=None):
                return (a, b, c)

        assert Q.x == (1, 5, None)
        assert Q.let(b=6).x == (1, 6, None)
        assert Q.let(c=0).x == (1, 5, 0)

    def test_value_missing_required_argument(self):
        class MyQuant(ExtendedInjector):
            @value
            def x(needed):
                return needed

        with pytest.raises(DependencyError) as excinfo:
            _ = MyQuant.x
        assert str(excinfo.value) == "'MyQuant' can not resolve attribute 'needed' while building 'x'"

    def test_value_returning_bare_this_is_refused(self):
        class Q(ExtendedInjector):
            @value
            def x():
                return this

        with pytest.raises(DependencyError):
            _ = Q.x

    def test_value_on_a_method_is_refused_naming_the_class(self):
        with pytest.raises(DependencyError, match="'Q'"):

            class Q(ExtendedInjector):
                @value
                def x(self):
                    return 1


# ============================================================================================
# 3. Inheritance, let, membership and errors.
# ============================================================================================


class TestInheritanceAndLet:
    def test_subclass_overrides_and_inherits(self):
        class Base(ExtendedInjector):
            tensor_quant = Quant
            scaling_impl = Scale
            scaling_init = 1.0

        class Child(Base):
            scaling_init = 3.0
            bit_width = 2

        quant = Child.tensor_quant
        assert quant.scaling_impl.scaling_init == 3.0
        assert quant.bit_width == 2
        assert Base.tensor_quant.scaling_impl.scaling_init == 1.0
        assert Base.tensor_quant.bit_width == 8

    def test_multiple_inheritance_follows_the_mro(self):
        class Base(ExtendedInjector):
            x = "base"
            y = "base"

        class A(Base):
            x = "a"

        class B(Base):
            z = "b"

        class C(B, A):
            pass

        assert C.__mro__.index(B) < C.__mro__.index(A) < C.__mro__.index(Base)
        # Python itself would see A's x: B does not override it.
        assert C.x == "a"
        assert C.y == "base"
        assert C.z == "b"

        class D(B, A):
            x = "d"

        assert D.x == "d"

        class B2(Base):
            x = "b2"

        class E(B2, A):
            pass

        assert E.x == "b2"

    def test_multiple_inheritance_wires_across_bases(self):
        class Scaling(ExtendedInjector):
            scaling_impl = Scale
            scaling_init = 0.5

        class Bits(ExtendedInjector):
            tensor_quant = Quant
            bit_width = 5

        class Q(Bits, Scaling):
            pass

        quant = Q.tensor_quant
        assert quant.bit_width == 5
        assert quant.scaling_impl.scaling_init == 0.5

    def test_plain_library_injector_can_be_a_base(self):
        class Plain(dependencies.Injector):
            a = 3

        class Q(ExtendedInjector, Plain):
            leaf = Leaf

        assert Q.leaf.a == 3

    def test_let_returns_a_new_injector_and_leaves_the_original_unchanged(self):
        class MyQuant(ExtendedInjector):
            tensor_quant = Quant
            scaling_impl = Scale
            scaling_init = 1.0

        before = dict(MyQuant.__dependencies__)
        derived = MyQuant.let(scaling_init=2.0, bit_width=3)
        assert derived is not MyQuant
        assert issubclass(derived, MyQuant)
        assert derived.tensor_quant.scaling_impl.scaling_init == 2.0
        assert derived.tensor_quant.bit_width == 3
        assert MyQuant.tensor_quant.scaling_impl.scaling_init == 1.0
        assert MyQuant.tensor_quant.bit_width == 8
        assert "bit_width" not in MyQuant
        assert MyQuant.__dependencies__ == before

    def test_let_replaces_classes_and_accepts_value_and_this(self):
        class Q(ExtendedInjector):
            tensor_quant = Quant
            scaling_impl = Scale
            scaling_init = 1.0
            channels = 3

        assert type(Q.let(scaling_impl=ChannelScale).tensor_quant.scaling_impl) is ChannelScale
        assert Q.let(bit_width=this.channels).tensor_quant.bit_width == 3
        assert Q.let(bit_width=value(lambda channels: channels * 2)).tensor_quant.bit_width == 6

    def test_let_chains(self):
        class Q(ExtendedInjector):
            a = 1
            b = 1

        derived = Q.let(a=2).let(b=3)
        assert (derived.a, derived.b) == (2, 3)
        assert (Q.a, Q.b) == (1, 1)

    def test_let_keeps_the_class_name_so_errors_name_the_users_quantizer(self):
        class MyQuant(ExtendedInjector):
            scaling_impl = Scale

        derived = MyQuant.let(bit_width=4).let(signed=False)
        assert derived.__name__ == "MyQuant"
        assert derived.__qualname__ == MyQuant.__qualname__
        with pytest.raises(DependencyError) as excinfo:
            _ = derived.scaling_impl
        assert str(excinfo.value) == (
            "'MyQuant' can not resolve attribute 'scaling_init' while building 'scaling_impl'"
        )

    @given(
        overrides=st.dictionaries(
            st.from_regex(r"[a-z][a-z0-9_]{0,12}", fullmatch=True).filter(lambda name: name not in ("let", "leaf")),
            st.one_of(
                st.integers(),
                st.floats(allow_nan=False),
                st.text(),
                st.booleans(),
                st.none(),
                st.tuples(st.integers(), st.text()),
            ),
            max_size=6,
        )
    )
    def test_let_with_random_names_and_values(self, overrides):
        class Q(ExtendedInjector):
            a = "original"
            leaf = Leaf

        derived = Q.let(**overrides)
        for name, expected in overrides.items():
            assert name in derived
            assert getattr(derived, name) is expected
        assert Q.a == "original"
        assert derived.a is overrides.get("a", "original")
        assert derived.leaf.a is overrides.get("a", "original")
        assert set(Q.__dependencies__) == {"a", "leaf"}

    def test_contains(self):
        class Q(ExtendedInjector):
            x = 1
            leaf = Leaf

        assert "x" in Q
        assert "leaf" in Q
        assert "missing" not in Q
        assert "x" in Q.let(y=2) and "y" in Q.let(y=2)

        class R(Q):
            pass

        assert "x" in R

    def test_getattr_with_a_default(self):
        class Q(ExtendedInjector):
            x = 1

        sentinel = object()
        assert getattr(Q, "missing", sentinel) is sentinel
        assert getattr(Q, "x", sentinel) == 1
        assert not hasattr(Q, "missing")
        assert hasattr(Q, "x")

    def test_dependency_error_hierarchy(self):
        class Q(ExtendedInjector):
            pass

        with pytest.raises(DependencyError) as excinfo:
            _ = Q.missing
        error = excinfo.value
        assert isinstance(error, AttributeError)
        assert isinstance(error, LibraryDependencyError)
        assert isinstance(error, QuantwireError)
        assert issubclass(DependencyError, AttributeError)
        assert issubclass(DependencyError, LibraryDependencyError)
        assert issubclass(DependencyError, QuantwireError)

    @pytest.mark.parametrize(
        "name", ["__foo__", "__len__", "__array_interface__", "__torch_function__", "__wrapped_fn__"]
    )
    def test_hasattr_on_dunders_is_false_without_raising(self, name):
        class Q(ExtendedInjector):
            x = 1

        assert hasattr(Q, name) is False
        assert hasattr(Q.let(y=1), name) is False
        with pytest.raises(AttributeError) as excinfo:
            getattr(Q, name)
        # Python protocols (copy, pickle, inspect, typing) probe dunders: a plain miss, not a
        # resolution error.
        assert not isinstance(excinfo.value, DependencyError)

    def test_copy_and_inspect_protocols_work_on_quantizers(self):
        class Q(ExtendedInjector):
            x = 1

        assert copy.copy(Q) is Q
        assert copy.deepcopy(Q) is Q
        assert "x" in dir(Q)


# ============================================================================================
# 4. Resolution never mutates the class, and is thread safe.
# ============================================================================================


class InnerConfig(ExtendedInjector):
    inner_value = 11


class MutationQuant(ExtendedInjector):
    scaling_init = 1.0
    per_channel = False
    channels = 2
    kind = "int"
    int_quant = Quant
    ternary_quant = Ternary
    table = {"k": 3}
    follow_declared = this.table["k"]
    config = InnerConfig

    @value
    def scaling_impl(per_channel):
        return ChannelScale if per_channel else Scale

    @value
    def tensor_quant(kind):
        return this.int_quant if kind == "int" else this.ternary_quant

    @value
    def deep():
        return this.tensor_quant.scaling_impl.scaling_init

    @value
    def nested():
        return InnerConfig


def _snapshot(cls):
    """Everything resolution could conceivably write to, for every injector class in the MRO."""
    state = {}
    for klass in cls.__mro__:
        if "__dependencies__" not in klass.__dict__:
            continue
        table = klass.__dict__["__dependencies__"]
        own = klass.__dict__.get("__own_dependencies__")
        state[klass] = {
            "table_id": id(table),
            "table": dict(table),
            "specs": {name: tuple(spec) for name, spec in table.items()},
            "own": None if own is None else dict(own),
            "class_dict": dict(vars(klass)),
        }
    return state


def _assert_same_snapshot(before, after):
    assert before.keys() == after.keys()
    for klass in before:
        old, new = before[klass], after[klass]
        assert old["table_id"] == new["table_id"], klass
        assert old["table"].keys() == new["table"].keys(), klass
        for name in old["table"]:
            assert old["table"][name] is new["table"][name], (klass, name)
            assert all(a is b for a, b in zip(old["specs"][name], new["specs"][name], strict=True))
        assert old["own"] == new["own"], klass
        assert old["class_dict"].keys() == new["class_dict"].keys(), klass
        for name, item in old["class_dict"].items():
            assert new["class_dict"][name] is item, (klass, name)


class TestNoMutation:
    @pytest.mark.parametrize(
        "quantizer",
        [
            MutationQuant,
            MutationQuant.let(per_channel=True, kind="ternary"),
            type("Sub", (MutationQuant,), {"channels": 5}),
        ],
        ids=["class", "let", "subclass"],
    )
    def test_resolution_leaves_the_class_untouched(self, quantizer):
        classes = [quantizer, MutationQuant, InnerConfig]
        before = {klass: _snapshot(klass) for klass in classes}
        for _ in range(3):
            for name in quantizer.__dependencies__:
                getattr(quantizer, name)
            assert quantizer.nested.inner_value == 11
            assert quantizer.config.inner_value == 11
        after = {klass: _snapshot(klass) for klass in classes}
        for klass in classes:
            _assert_same_snapshot(before[klass], after[klass])

    def test_values_stay_right_after_resolving_the_other_branch(self):
        # A resolver that cached a @value's produced spec on the class would keep the first branch.
        per_channel = MutationQuant.let(per_channel=True)
        assert type(per_channel.scaling_impl) is ChannelScale
        assert type(MutationQuant.scaling_impl) is Scale
        assert type(per_channel.scaling_impl) is ChannelScale
        ternary = MutationQuant.let(kind="ternary")
        assert type(ternary.tensor_quant) is Ternary
        assert type(MutationQuant.tensor_quant) is Quant


class ConcurrentBase(ExtendedInjector):
    scaling_init = 1.0
    per_channel = False
    channels = 4
    kind = "int"
    int_quant = Quant
    ternary_quant = Ternary

    @value
    def scaling_impl(per_channel):
        return ChannelScale if per_channel else Scale

    @value
    def tensor_quant(kind):
        return this.int_quant if kind == "int" else this.ternary_quant


CONCURRENT_CASES = [
    (ConcurrentBase, Quant, Scale, 1.0),
    (ConcurrentBase.let(per_channel=True, scaling_init=2.0), Quant, ChannelScale, 2.0),
    (ConcurrentBase.let(kind="ternary", scaling_init=3.0), Ternary, Scale, 3.0),
    (ConcurrentBase.let(kind="ternary", per_channel=True, scaling_init=4.0), Ternary, ChannelScale, 4.0),
]


class TestConcurrency:
    def test_threads_resolving_the_same_quantizers(self):
        workers, jobs, reads = 8, 64, 150
        barrier = threading.Barrier(workers)
        before = _snapshot(ConcurrentBase)

        def job(index):
            if index < workers:
                barrier.wait(timeout=30)
            for read in range(reads):
                quantizer, quant_type, scaling_type, scaling_init = CONCURRENT_CASES[(index + read) % 4]
                quant = quantizer.tensor_quant
                assert type(quant) is quant_type
                assert type(quant.scaling_impl) is scaling_type
                assert quant.scaling_impl.scaling_init == scaling_init
            return index

        old_interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        try:
            with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
                futures = [pool.submit(job, index) for index in range(jobs)]
                done = [future.result(timeout=120) for future in futures]
        finally:
            sys.setswitchinterval(old_interval)
        assert sorted(done) == list(range(jobs))
        _assert_same_snapshot(before, _snapshot(ConcurrentBase))


# ============================================================================================
# 5. Class definition: bookkeeping dunders, reserved names, bases.
# ============================================================================================


BOOKKEEPING = {
    "__firstlineno__": 3,
    "__static_attributes__": ("a", "b"),
    "__classdictcell__": types.CellType(),
    "__annotations__": {"x": int},
    "__type_params__": (),
    "__orig_bases__": (ExtendedInjector,),
}


class TestClassDefinition:
    @pytest.mark.parametrize(
        "extra",
        [{name: item} for name, item in BOOKKEEPING.items()] + [BOOKKEEPING],
        ids=[*BOOKKEEPING, "all"],
    )
    def test_bookkeeping_dunders_of_newer_pythons_are_accepted(self, extra):
        Q = InjectorMeta(
            "Q",
            (ExtendedInjector,),
            {"__module__": __name__, "__qualname__": "Q", **extra, "x": 1, "leaf": Leaf, "a": 2},
        )
        assert Q.x == 1
        assert Q.leaf.a == 2
        assert Q.__name__ == "Q" and Q.__module__ == __name__
        for name in extra:
            assert name not in Q
            assert name not in Q.__dependencies__

    def test_example_from_the_brief(self):
        Q = type(ExtendedInjector)(
            "Q",
            (ExtendedInjector,),
            {
                "__module__": __name__,
                "__qualname__": "Q",
                "__firstlineno__": 3,
                "__static_attributes__": (),
                "x": 1,
            },
        )
        assert Q.x == 1
        assert Q.let(x=2).x == 2

    def test_class_body_with_annotations_docstring_and_class_cell(self):
        class Q(ExtendedInjector):
            """A documented quantizer."""

            x: int = 1
            y: str  # annotation only: not an attribute

            @value
            def name():
                return __class__.__name__  # makes the body carry __classcell__

        assert Q.__doc__ == "A documented quantizer."
        assert Q.__module__ == __name__
        assert Q.x == 1
        assert "y" not in Q
        assert Q.name == "Q"

    @pytest.mark.parametrize(
        "name", ["__foo__", "__init__", "__call__", "__init_subclass__", "__slots__", "__getattr__"]
    )
    def test_other_dunders_are_refused_naming_the_class(self, name):
        with pytest.raises(DependencyError) as excinfo:
            InjectorMeta("MyQuant", (ExtendedInjector,), {"__module__": __name__, name: 1})
        assert "'MyQuant'" in str(excinfo.value)
        assert repr(name) in str(excinfo.value)

    def test_user_dunder_in_a_class_body_is_refused(self):
        with pytest.raises(DependencyError, match="'MyQuant'"):

            class MyQuant(ExtendedInjector):
                __foo__ = 1

    def test_redefining_let_is_refused(self):
        with pytest.raises(DependencyError, match="'MyQuant'.*'let'"):

            class MyQuant(ExtendedInjector):
                let = 1

        class Q(ExtendedInjector):
            x = 1

        with pytest.raises(DependencyError, match="'Q'.*'let'"):
            Q.let(let=2)

    def test_inheriting_from_a_non_injector_is_refused(self):
        class Mixin:
            pass

        with pytest.raises(DependencyError, match="'MyQuant'.*'Mixin'"):

            class MyQuant(ExtendedInjector, Mixin):
                pass


# ============================================================================================
# 6. Constructors with *args / **kwargs.
# ============================================================================================


class TestVarArgs:
    def test_torch_identity(self):
        class Q(ExtendedInjector):
            act = torch.nn.Identity

        first = Q.act
        assert isinstance(first, torch.nn.Identity)
        assert Q.act is not first

    def test_named_parameters_are_wired_and_varargs_left_empty(self):
        class Q(ExtendedInjector):
            thing = VarArgs
            a = 1
            args = "not passed"  # only named parameters are wired
            kwargs = "not passed"

        thing = Q.thing
        assert thing.a == 1
        assert thing.args == ()
        assert thing.kwargs == {}
        assert thing.scale == 1.0
        assert Q.let(scale=2.0).thing.scale == 2.0

    def test_missing_named_parameter_of_a_varargs_class(self):
        class MyQuant(ExtendedInjector):
            thing = VarArgs

        with pytest.raises(DependencyError) as excinfo:
            _ = MyQuant.thing
        assert str(excinfo.value) == "'MyQuant' can not resolve attribute 'a' while building 'thing'"

    def test_only_varargs(self):
        class Q(ExtendedInjector):
            thing = OnlyVarArgs
            x = 1

        assert Q.thing.args == () and Q.thing.kwargs == {}

    def test_value_returning_a_varargs_class(self):
        class Q(ExtendedInjector):
            a = 9

            @value
            def thing():
                return VarArgs

            @value
            def act():
                return torch.nn.Identity

        assert Q.thing.a == 9
        assert isinstance(Q.act, torch.nn.Identity)


# ============================================================================================
# 7. Circular dependencies are DependencyErrors, never RecursionErrors.
# ============================================================================================


class A1:
    def __init__(self, b):
        self.b = b


class B1:
    def __init__(self, c):
        self.c = c


class C1:
    def __init__(self, b):
        self.b = b


class D1:
    def __init__(self, a):
        self.a = a


class TestCircles:
    def test_declared_class_cycle(self):
        with pytest.raises(DependencyError, match="'MyQuant'"):

            class MyQuant(ExtendedInjector):
                a = D1  # needs a: itself
                b = 1

        with pytest.raises(DependencyError, match="'MyQuant2'.*circular"):

            class MyQuant2(ExtendedInjector):
                a = A1
                b = D1

    @pytest.mark.parametrize("order", ["abc", "bca", "cab", "acb"])
    def test_declared_cycle_not_through_the_first_attribute(self, order):
        # a -> b -> c -> b: the cycle does not pass through a.
        attributes = {"a": A1, "b": B1, "c": C1}
        namespace = {"__module__": __name__, **{name: attributes[name] for name in order}}
        with pytest.raises(DependencyError, match="'MyQuant'.*circular"):
            InjectorMeta("MyQuant", (ExtendedInjector,), namespace)

    def test_value_produced_class_cycle(self):
        class MyQuant(ExtendedInjector):
            @value
            def b():
                return B1

            @value
            def c():
                return C1

            a = A1

        with pytest.raises(DependencyError, match="'MyQuant'.*circular"):
            _ = MyQuant.a

    def test_value_returning_a_class_that_needs_itself(self):
        class MyQuant(ExtendedInjector):
            @value
            def a():
                return D1

        with pytest.raises(DependencyError, match="circular"):
            _ = MyQuant.a

    def test_declared_this_loop(self):
        with pytest.raises(DependencyError, match="'MyQuant'"):

            class MyQuant(ExtendedInjector):
                x = this.y
                y = this.x

        with pytest.raises(DependencyError, match="'MyQuant2'"):

            class MyQuant2(ExtendedInjector):
                x = this.x

    def test_value_this_loop(self):
        class MyQuant(ExtendedInjector):
            @value
            def x():
                return this.y

            @value
            def y():
                return this.x

            @value
            def z():
                return this.z

        with pytest.raises(DependencyError, match="'MyQuant'.*circular"):
            _ = MyQuant.x
        with pytest.raises(DependencyError, match="circular"):
            _ = MyQuant.z

    def test_this_and_class_loop(self):
        # `leaf` needs `a`, and `a` follows `leaf`.
        class Looping(ExtendedInjector):
            leaf = Leaf

            @value
            def a():
                return this.leaf

        with pytest.raises(DependencyError, match="circular"):
            _ = Looping.leaf

    def test_value_argument_loop(self):
        class Looping(ExtendedInjector):
            @value
            def x(y):
                return y

            @value
            def y():
                return this.x

        with pytest.raises(DependencyError, match="circular"):
            _ = Looping.x


# ============================================================================================
# 8. Pickling.
# ============================================================================================


PROTOCOLS = range(2, pickle.HIGHEST_PROTOCOL + 1)


class TestPickle:
    @pytest.mark.parametrize("protocol", PROTOCOLS)
    def test_module_level_quantizer_pickles_by_reference(self, protocol):
        assert pickle.loads(pickle.dumps(PickleQuant, protocol=protocol)) is PickleQuant

    @pytest.mark.parametrize("protocol", PROTOCOLS)
    def test_let_round_trips_through_pickle(self, protocol):
        derived = PickleQuant.let(scaling_init=2.0)
        restored = pickle.loads(pickle.dumps(derived, protocol=protocol))
        assert restored.__name__ == "PickleQuant"
        assert issubclass(restored, PickleQuant)
        assert restored.scaling_init == 2.0
        quant = restored.tensor_quant
        assert quant.scaling_impl.scaling_init == 2.0
        assert quant.bit_width == 4
        assert PickleQuant.scaling_init == 1.0

    def test_let_round_trips_through_deepcopy(self):
        derived = PickleQuant.let(scaling_init=2.0)
        for copied in (copy.deepcopy(derived), copy.copy(derived), copy.deepcopy({"q": derived})["q"]):
            assert copied.scaling_init == 2.0
            assert copied.tensor_quant.scaling_impl.scaling_init == 2.0
            assert copied.__name__ == "PickleQuant"

    @pytest.mark.parametrize("protocol", PROTOCOLS)
    def test_nested_let_round_trips(self, protocol):
        derived = PickleQuant.let(scaling_init=2.0).let(bit_width=2).let(scaling_impl=ChannelScale, channels=7)
        for restored in (pickle.loads(pickle.dumps(derived, protocol=protocol)), copy.deepcopy(derived)):
            quant = restored.tensor_quant
            assert type(quant.scaling_impl) is ChannelScale
            assert quant.scaling_impl.channels == 7
            assert quant.scaling_impl.scaling_init == 2.0
            assert quant.bit_width == 2
            assert restored.__name__ == "PickleQuant"
            assert issubclass(restored, PickleQuant)

    def test_let_of_a_quantizer_with_values_round_trips(self):
        derived = PickleValueQuant.let(per_channel=True, scaling_init=5.0)
        restored = pickle.loads(pickle.dumps(derived))
        assert type(restored.tensor_quant.scaling_impl) is ChannelScale
        assert restored.tensor_quant.scaling_impl.scaling_init == 5.0
        assert type(PickleValueQuant.tensor_quant.scaling_impl) is Scale

    def test_pickled_inside_a_container(self):
        payload = {"weight_quant": PickleQuant, "act_quant": PickleQuant.let(bit_width=6)}
        restored = pickle.loads(pickle.dumps(payload))
        assert restored["weight_quant"] is PickleQuant
        assert restored["act_quant"].tensor_quant.bit_width == 6

    def test_let_of_a_torch_quantizer_round_trips(self):
        derived = TorchBinaryQuant.let(scaling_init=2.0)
        for restored in (pickle.loads(pickle.dumps(derived)), copy.deepcopy(derived)):
            quant = restored.tensor_quant
            assert isinstance(quant, BinaryQuant)
            assert quant.scaling_impl.value.item() == 2.0

    @given(
        scaling_init=st.floats(allow_nan=False, allow_infinity=False),
        bit_width=st.integers(1, 32),
        name=st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True).filter(
            lambda name: name != "let" and name not in PickleQuant
        ),
        extra=st.one_of(st.integers(), st.text(), st.none(), st.tuples(st.booleans(), st.floats(allow_nan=False))),
    )
    def test_random_let_overrides_round_trip(self, scaling_init, bit_width, name, extra):
        derived = PickleQuant.let(scaling_init=scaling_init).let(bit_width=bit_width, **{name: extra})
        restored = pickle.loads(pickle.dumps(derived))
        assert getattr(restored, name) == getattr(derived, name)
        quant, original = restored.tensor_quant, derived.tensor_quant
        assert quant.scaling_impl.scaling_init == original.scaling_impl.scaling_init
        assert quant.bit_width == original.bit_width


# ============================================================================================
# 9. Nested injectors and ``this << n``.
# ============================================================================================


class TestNested:
    def test_nested_injector_attribute(self):
        class Inner(ExtendedInjector):
            z = 5
            leaf = Leaf
            a = "inner"

        class Outer(ExtendedInjector):
            inner = Inner
            w = this.inner.z
            built = this.inner.leaf.a

        nested = Outer.inner
        assert issubclass(nested, Inner)
        assert nested.z == 5
        assert nested.leaf.a == "inner"
        assert Outer.w == 5
        assert Outer.built == "inner"

    def test_parent_access_with_this_shift(self):
        class Inner(ExtendedInjector):
            y = (this << 1).x
            scaling_impl = Scale
            scaling_init = (this << 1).scaling_init

        class Outer(ExtendedInjector):
            x = 10
            scaling_init = 0.75
            inner = Inner
            via_inner = this.inner.y

        assert Outer.inner.y == 10
        assert Outer.via_inner == 10
        assert Outer.inner.scaling_impl.scaling_init == 0.75
        assert Outer.let(x=11).inner.y == 11
        with pytest.raises(DependencyError):
            _ = Inner.y  # no parent outside of Outer

    def test_two_levels_of_parents(self):
        class Innermost(ExtendedInjector):
            top = (this << 2).x
            middle = (this << 1).m

        class Middle(ExtendedInjector):
            m = "middle"
            innermost = Innermost

        class Outer(ExtendedInjector):
            x = "outer"
            middle = Middle

        assert Outer.middle.innermost.top == "outer"
        assert Outer.middle.innermost.middle == "middle"

    def test_value_returning_an_injector_nests_it(self):
        class Inner(ExtendedInjector):
            y = (this << 1).x

        class Outer(ExtendedInjector):
            x = 3

            @value
            def inner():
                return Inner

        assert Outer.inner.y == 3

    def test_nested_resolution_does_not_touch_the_inner_class(self):
        class Inner(ExtendedInjector):
            y = (this << 1).x

        class Outer(ExtendedInjector):
            x = 1
            inner = Inner

        before = _snapshot(Inner)
        assert Outer.inner.y == 1
        assert "__parent__" not in Inner.__dependencies__
        _assert_same_snapshot(before, _snapshot(Inner))


# ============================================================================================
# 10. Quantizers can not be modified in place.
# ============================================================================================


class TestImmutable:
    @pytest.mark.parametrize("name", ["x", "new_attribute"])
    def test_setting_an_attribute_is_refused_pointing_at_let(self, name):
        class MyQuant(ExtendedInjector):
            x = 1

        with pytest.raises(DependencyError) as excinfo:
            setattr(MyQuant, name, 2)
        assert "'MyQuant'" in str(excinfo.value)
        assert re.search(r"\blet\b", str(excinfo.value))
        assert MyQuant.x == 1
        assert set(MyQuant.__dependencies__) == {"x"}

    @pytest.mark.parametrize("name", ["x", "new_attribute"])
    def test_deleting_an_attribute_is_refused_pointing_at_let(self, name):
        class MyQuant(ExtendedInjector):
            x = 1

        with pytest.raises(DependencyError) as excinfo:
            delattr(MyQuant, name)
        assert "'MyQuant'" in str(excinfo.value)
        assert re.search(r"\blet\b", str(excinfo.value))
        assert MyQuant.x == 1

    def test_let_derived_quantizers_are_immutable_too(self):
        class MyQuant(ExtendedInjector):
            x = 1

        derived = MyQuant.let(x=2)
        with pytest.raises(DependencyError, match="let"):
            derived.x = 3
        with pytest.raises(DependencyError, match="let"):
            del derived.x
        assert derived.x == 2
