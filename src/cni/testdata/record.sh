#!/bin/sh
# Recording test plugin (copied under several names by the tests).
# Appends "<its name> <CNI_COMMAND> <stdin on one line>" to ./log next to
# itself (VERSION is not logged); on ADD prints a result whose "plugins" list is prevResult's list
# plus its own name (the rest of the result is fixed). VERSION answers
# 0.3.0…1.1.0 unless ./versions says otherwise; other commands print nothing.
name=$(basename "$0")
stdin=$(cat)
[ "$CNI_COMMAND" = VERSION ] || printf '%s %s %s\n' "$name" "$CNI_COMMAND" "$stdin" >> "$(dirname "$0")/log"
case "$CNI_COMMAND" in
ADD) ;;
VERSION)
  # ./versions next to the plugin overrides the answer (a JSON list).
  v='["0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]'
  [ -f "$(dirname "$0")/versions" ] && v=$(cat "$(dirname "$0")/versions")
  printf '{"cniVersion":"1.1.0","supportedVersions":%s}\n' "$v"; exit 0 ;;
*) exit 0 ;;
esac
version=$(printf '%s' "$stdin" | sed -n 's/.*"cniVersion":"\([^"]*\)".*/\1/p')
prev=$(printf '%s' "$stdin" | sed -n 's/.*"plugins":\[\([^]]*\)\].*/\1/p')
list="${prev:+$prev,}\"$name\""
printf '{"cniVersion":"%s","interfaces":[{"name":"%s","sandbox":"%s"}],"ips":[{"address":"10.1.2.3/24","gateway":"10.1.2.1","interface":0}],"plugins":[%s]}\n' \
  "$version" "$CNI_IFNAME" "$CNI_NETNS" "$list"
