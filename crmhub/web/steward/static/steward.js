// Keyboard shortcuts. A key clicks the button or link marked data-key="<key>" on the page, or
// focuses the control marked data-focus-key="<key>" (the first value choice on the compare
// view: from there Tab moves between fields and the arrow keys pick a side). Typing in a text
// field never triggers one; Escape leaves the field. No inline script anywhere (strict CSP).
(function () {
  "use strict";
  // Inputs that take no typed text: a shortcut pressed on them still counts.
  var KEYLESS = { radio: 1, checkbox: 1, button: 1, submit: 1, reset: 1 };

  function typing(target) {
    if (!target || !target.tagName) return false;
    var tag = target.tagName.toLowerCase();
    if (tag === "textarea" || tag === "select" || target.isContentEditable) return true;
    return tag === "input" && !KEYLESS[(target.getAttribute("type") || "text").toLowerCase()];
  }

  function marked(attribute, key) {
    var candidates = document.querySelectorAll("[" + attribute + "]");
    for (var i = 0; i < candidates.length; i++) {
      if (candidates[i].getAttribute(attribute) === key) return candidates[i];
    }
    return null;
  }

  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey || event.defaultPrevented) return;
    var target = event.target;
    if (typing(target)) {
      if (event.key === "Escape") target.blur();
      return;
    }
    // Enter and Space keep their own meaning on a focused link, button or choice.
    if ((event.key === "Enter" || event.key === " ") && target !== document.body &&
        target.matches && target.matches("a[href], button, input, summary, label")) {
      return;
    }
    var focus = marked("data-focus-key", event.key);
    if (focus) {
      event.preventDefault();
      focus.focus();
      return;
    }
    var control = marked("data-key", event.key);
    if (control) {
      event.preventDefault();
      control.click();
    }
  });
})();
