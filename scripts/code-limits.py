#!/usr/bin/env python3
"""Code-size limits CI keeps (issue 29): no file under a crate's src/ over 800 lines before its
`#[cfg(test)]` module, and no function there over 80 lines; tests are excepted. Prints each
offender as FILE/FN rows and exits 1 if there is one.

Usage: scripts/code-limits.py [DIR]   (DIR defaults to crates)

A small brace counter, not a parser: it skips strings, chars and comments, which is enough
for rustfmt-formatted code."""
import os
import re
import sys
FN=re.compile(r'^\s*(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?(extern\s+"C"\s+)?fn\s+(\w+)')
def strip(line, state):
    # remove strings/chars/comments crudely; state: in_block_comment, in_raw
    out=[];i=0;n=len(line)
    while i<n:
        c=line[i]
        if state['bc']:
            if line.startswith('*/',i): state['bc']=False;i+=2;continue
            i+=1;continue
        if state['str']:
            if c=='\\': i+=2;continue
            if c=='"':
                # raw strings end with "#*
                h=state['hashes']
                if line[i+1:i+1+h]=='#'*h: state['str']=False;i+=1+h;continue
            i+=1;continue
        if line.startswith('//',i): break
        if line.startswith('/*',i): state['bc']=True;i+=2;continue
        m=re.match(r'b?r(#*)"',line[i:])
        if m and (i==0 or not (line[i-1].isalnum() or line[i-1]=='_')):
            state['str']=True;state['hashes']=len(m.group(1));i+=len(m.group(0));continue
        if c=='"': state['str']=True;state['hashes']=0;i+=1;continue
        m=re.match(r"b?'(\\.[^']*|[^'\\])'",line[i:])
        if m and (i==0 or not (line[i-1].isalnum() or line[i-1]=='_')): i+=len(m.group(0));continue
        out.append(c);i+=1
    return ''.join(out)
res=[];big=[]
for root,_,files in os.walk(sys.argv[1] if len(sys.argv) > 1 else 'crates'):
    if '/tests' in root or 'target' in root or '/benches' in root: continue
    for f in files:
        if not f.endswith('.rs'): continue
        p=os.path.join(root,f)
        if '/src/' not in p: continue
        lines=open(p).read().split('\n')
        # non-test lines: stop at #[cfg(test)]
        cut=len(lines)
        for k,l in enumerate(lines):
            if l.strip()=='#[cfg(test)]': cut=k;break
        if cut>800: big.append((cut,p))
        st={'bc':False,'str':False,'hashes':0}
        stripped=[strip(l,st) for l in lines[:cut]]
        for k,l in enumerate(lines[:cut]):
            m=FN.match(l)
            if not m: continue
            depth=0;started=False
            for j in range(k,cut):
                s=stripped[j]
                if not started and ';' in s and '{' not in s and depth==0: break
                for ch in s:
                    if ch=='{': depth+=1;started=True
                    elif ch=='}': depth-=1
                if started and depth<=0:
                    ln=j-k+1
                    if ln>80: res.append((ln,p,k+1,m.group(7)))
                    break
for x in sorted(big): print('FILE',*x)
for x in sorted(res): print('FN',*x)
print(len(big),'files over 800 lines,',len(res),'functions over 80 lines')
sys.exit(1 if big or res else 0)
