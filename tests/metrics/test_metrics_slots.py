"""The E2E slot matcher: wrong, added and missing slots of a text against its MR."""

from __future__ import annotations

import pytest

from lorakit.metrics.slots import check_slots, parse_mr, slot_report

MR = "name : The Eagle | Type : coffee shop | food : Japanese | price : £ 20 - 25 | customer rating : 1 out of 5 | " \
     "area : riverside | family friendly : no | near : Burger King ||"  # fmt: skip
NAMES = {"The Eagle", "Burger King", "Raja Indian Cuisine", "The Golden Palace", "Golden Palace"}


def test_both_mr_forms_parse_to_e2e_attribute_names():
    raw = "name[The Eagle], eatType[coffee shop], priceRange[£20-25], familyFriendly[no]"
    assert parse_mr(raw) == {"name": "The Eagle", "eatType": "coffee shop", "priceRange": "£20-25",
                             "familyFriendly": "no"}  # fmt: skip
    assert parse_mr(MR)["priceRange"] == "£ 20 - 25" and parse_mr(MR)["familyFriendly"] == "no"


def test_a_faithful_text_has_nothing_wrong_added_or_missing():
    text = ("The Eagle is a coffee shop near Burger King by the riverside serving sushi for £ 20 - 25 . "
            "It has a one star rating and is not family - friendly .")  # fmt: skip
    check = check_slots(MR, text, NAMES)
    assert (check.wrong, check.added, check.missing) == ((), (), ())


def test_wrong_values_and_foreign_names_are_counted():
    text = "The Golden Palace is an expensive Italian pub in the city centre . It is family friendly ."
    check = check_slots(MR, text, NAMES)
    assert set(check.wrong) == {("name", "The Golden Palace"), ("food", "Italian"), ("priceRange", "high"),
                                ("area", "city centre"), ("eatType", "pub"), ("familyFriendly", "yes")}  # fmt: skip
    assert {"name", "near", "food", "area", "eatType", "priceRange", "customer rating", "familyFriendly"} == set(
        check.missing
    )


def test_equivalent_forms_are_one_value_and_generic_restaurant_never_contradicts():
    text = "The Eagle , a low rated Japanese restaurant and coffee shop , has moderate prices ."
    check = check_slots(MR, text, NAMES)
    assert check.wrong == ()  # "low" is "1 out of 5", "moderate" is "£20-25", "restaurant" is generic
    assert "customer rating" not in check.missing and "priceRange" not in check.missing


def test_names_are_matched_whole_and_before_the_values():
    mr = "name : Aromi | food : Chinese | near : Raja Indian Cuisine"
    check = check_slots(mr, "Aromi serves Chinese food near Raja Indian Cuisine .", NAMES)
    assert check.wrong == () and check.missing == ()  # "Indian" inside the name states no food
    check = check_slots("name : Golden Palace", "Try The Golden Palace .", NAMES)
    assert check.wrong == (("name", "The Golden Palace"),) and check.missing == ("name",)


def test_added_is_an_attribute_the_mr_lacks_and_negation_is_no_only():
    check = check_slots("name : Aromi | family friendly : yes", "Aromi is cheap but not kid friendly .", NAMES)
    assert check.added == (("priceRange", "cheap"),)
    assert check.wrong == (("familyFriendly", "no"),)


def test_report_totals_and_misaligned_input():
    report = slot_report([MR, MR], ["The Eagle is an Italian pub .", "The Eagle serves sushi ."], NAMES)
    assert report["texts"] == 2 and report["texts_with_wrong"] == 1 and report["wrong"] == 2
    assert report["mr_slots"] == 16
    with pytest.raises(ValueError, match="2 MRs but 1 texts"):
        slot_report([MR, MR], ["x"])
